//! G.711 (ITU-T, 1972): μ-law (PCMU, North America and Japan) and A-law (PCMA, the rest of the
//! world) companding of 8 kHz audio, 8 bits a sample.
//!
//! Why here: the AI bridge speaks μ-law only (Twilio Media Streams), while many European and
//! wholesale trunks offer PCMA first; the relay transcodes between the two legs when their
//! negotiated codecs differ. Every conversion is a lookup in a table computed at compile time,
//! so transcoding a 160-byte frame costs 160 loads and no branches.
//!
//! The encoders follow the segment rules of G.711 (the reference implementation published by
//! Sun Microsystems and used by most open-source stacks): μ-law with bias 0x84 and clipping at
//! 32635, A-law with even-bit inversion (0x55). The μ-law ↔ A-law tables map each code to the
//! code of the other law whose decoded value is nearest, which is what G.711's own conversion
//! tables aim at; a code that exists in both laws (most of them) maps back to itself.

/// The μ-law code of digital silence (linear 0).
pub const ULAW_SILENCE: u8 = 0xFF;
/// The A-law code of digital silence (the value nearest linear 0).
pub const ALAW_SILENCE: u8 = 0xD5;

const ULAW_BIAS: i32 = 0x84;
const ULAW_CLIP: i32 = 32635;

/// Decodes one μ-law code to a 16-bit linear sample.
///
/// Why: the bridge and tests need linear audio (to compare what survives transcoding); the
/// relay itself only uses the byte-to-byte tables.
#[inline]
pub fn ulaw_to_linear(code: u8) -> i16 {
    ULAW_DECODE[code as usize]
}

/// Decodes one A-law code to a 16-bit linear sample.
#[inline]
pub fn alaw_to_linear(code: u8) -> i16 {
    ALAW_DECODE[code as usize]
}

/// Encodes one 16-bit linear sample as μ-law.
#[inline]
pub fn linear_to_ulaw(sample: i16) -> u8 {
    encode_ulaw(sample)
}

/// Encodes one 16-bit linear sample as A-law.
#[inline]
pub fn linear_to_alaw(sample: i16) -> u8 {
    encode_alaw(sample)
}

/// Converts one μ-law code to the A-law code of the nearest value, without a linear step.
#[inline]
pub fn ulaw_to_alaw(code: u8) -> u8 {
    ULAW_TO_ALAW[code as usize]
}

/// Converts one A-law code to the μ-law code of the nearest value, without a linear step.
#[inline]
pub fn alaw_to_ulaw(code: u8) -> u8 {
    ALAW_TO_ULAW[code as usize]
}

/// Transcodes a μ-law buffer to A-law in place (one RTP payload, typically 160 bytes).
pub fn ulaw_to_alaw_in_place(buf: &mut [u8]) {
    for b in buf {
        *b = ULAW_TO_ALAW[*b as usize];
    }
}

/// Transcodes an A-law buffer to μ-law in place.
pub fn alaw_to_ulaw_in_place(buf: &mut [u8]) {
    for b in buf {
        *b = ALAW_TO_ULAW[*b as usize];
    }
}

/// Decodes a μ-law buffer into linear samples appended to `out`.
pub fn decode_ulaw(codes: &[u8], out: &mut Vec<i16>) {
    out.extend(codes.iter().map(|&c| ULAW_DECODE[c as usize]));
}

/// Decodes an A-law buffer into linear samples appended to `out`.
pub fn decode_alaw(codes: &[u8], out: &mut Vec<i16>) {
    out.extend(codes.iter().map(|&c| ALAW_DECODE[c as usize]));
}

/// Encodes linear samples as μ-law, appended to `out`.
pub fn encode_ulaw_samples(samples: &[i16], out: &mut Vec<u8>) {
    out.extend(samples.iter().map(|&s| encode_ulaw(s)));
}

/// Encodes linear samples as A-law, appended to `out`.
pub fn encode_alaw_samples(samples: &[i16], out: &mut Vec<u8>) {
    out.extend(samples.iter().map(|&s| encode_alaw(s)));
}

const fn decode_ulaw_const(code: u8) -> i16 {
    let u = !code;
    let t = (((u & 0x0F) as i32) << 3) + ULAW_BIAS;
    let t = t << ((u & 0x70) >> 4);
    let v = if u & 0x80 != 0 { ULAW_BIAS - t } else { t - ULAW_BIAS };
    v as i16
}

const fn decode_alaw_const(code: u8) -> i16 {
    let a = code ^ 0x55;
    let mut t = ((a & 0x0F) as i32) << 4;
    let seg = ((a & 0x70) >> 4) as i32;
    match seg {
        0 => t += 8,
        1 => t += 0x108,
        _ => {
            t += 0x108;
            t <<= seg - 1;
        }
    }
    let v = if a & 0x80 != 0 { t } else { -t };
    v as i16
}

/// Segment (0..=7) of a magnitude for the given segment end points, 8 when beyond the last.
const fn segment(value: i32, ends: &[i32; 8]) -> i32 {
    let mut i = 0;
    while i < 8 {
        if value <= ends[i] {
            return i as i32;
        }
        i += 1;
    }
    8
}

const ULAW_SEG_END: [i32; 8] = [0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF, 0x3FFF, 0x7FFF];
const ALAW_SEG_END: [i32; 8] = [0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF];

const fn encode_ulaw(sample: i16) -> u8 {
    let mut pcm = sample as i32;
    let mask: u8;
    if pcm < 0 {
        pcm = -pcm;
        mask = 0x7F;
    } else {
        mask = 0xFF;
    }
    if pcm > ULAW_CLIP {
        pcm = ULAW_CLIP;
    }
    pcm += ULAW_BIAS;
    let seg = segment(pcm, &ULAW_SEG_END);
    if seg >= 8 {
        return 0x7F ^ mask;
    }
    let uval = ((seg << 4) | ((pcm >> (seg + 3)) & 0x0F)) as u8;
    uval ^ mask
}

const fn encode_alaw(sample: i16) -> u8 {
    // The reference works on 13-bit magnitudes: drop the three low bits first.
    let mut pcm = (sample as i32) >> 3;
    let mask: u8;
    if pcm >= 0 {
        mask = 0xD5;
    } else {
        mask = 0x55;
        pcm = -pcm - 1;
    }
    let seg = segment(pcm, &ALAW_SEG_END);
    if seg >= 8 {
        return 0x7F ^ mask;
    }
    let mut aval = (seg << 4) as u8;
    if seg < 2 {
        aval |= ((pcm >> 1) & 0x0F) as u8;
    } else {
        aval |= ((pcm >> seg) & 0x0F) as u8;
    }
    aval ^ mask
}

const fn build_decode(alaw: bool) -> [i16; 256] {
    let mut table = [0i16; 256];
    let mut i = 0;
    while i < 256 {
        table[i] = if alaw { decode_alaw_const(i as u8) } else { decode_ulaw_const(i as u8) };
        i += 1;
    }
    table
}

/// For every code of one law, the code of the other law whose decoded value is nearest (ties go
/// to the smaller magnitude, which keeps silence silent).
const fn build_transcode(from_alaw: bool) -> [u8; 256] {
    let mut table = [0u8; 256];
    let mut i = 0;
    while i < 256 {
        let value = if from_alaw { decode_alaw_const(i as u8) as i32 } else { decode_ulaw_const(i as u8) as i32 };
        let mut best = 0u8;
        let mut best_dist = i32::MAX;
        let mut best_mag = i32::MAX;
        let mut j = 0;
        while j < 256 {
            let candidate =
                if from_alaw { decode_ulaw_const(j as u8) as i32 } else { decode_alaw_const(j as u8) as i32 };
            // Keep the sign: a negative sample never becomes a positive code.
            if (candidate < 0) == (value < 0) || candidate == 0 {
                let dist = (candidate - value).abs();
                let mag = candidate.abs();
                if dist < best_dist || (dist == best_dist && mag < best_mag) {
                    best = j as u8;
                    best_dist = dist;
                    best_mag = mag;
                }
            }
            j += 1;
        }
        table[i] = best;
        i += 1;
    }
    table
}

static ULAW_DECODE: [i16; 256] = build_decode(false);
static ALAW_DECODE: [i16; 256] = build_decode(true);
static ULAW_TO_ALAW: [u8; 256] = build_transcode(false);
static ALAW_TO_ULAW: [u8; 256] = build_transcode(true);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ulaw_known_values() {
        assert_eq!(ulaw_to_linear(0xFF), 0);
        assert_eq!(ulaw_to_linear(0x7F), 0);
        assert_eq!(ulaw_to_linear(0x00), -32124);
        assert_eq!(ulaw_to_linear(0x80), 32124);
        assert_eq!(ulaw_to_linear(0xFE), 8);
        assert_eq!(ulaw_to_linear(0x7E), -8);
        assert_eq!(linear_to_ulaw(0), 0xFF);
        assert_eq!(linear_to_ulaw(i16::MAX), 0x80);
        assert_eq!(linear_to_ulaw(i16::MIN), 0x00);
        assert_eq!(linear_to_ulaw(-1), 0x7F);
    }

    #[test]
    fn alaw_known_values() {
        assert_eq!(alaw_to_linear(0xD5), 8);
        assert_eq!(alaw_to_linear(0x55), -8);
        assert_eq!(alaw_to_linear(0xAA), 32256);
        assert_eq!(alaw_to_linear(0x2A), -32256);
        assert_eq!(linear_to_alaw(0), 0xD5);
        assert_eq!(linear_to_alaw(i16::MAX), 0xAA);
        assert_eq!(linear_to_alaw(i16::MIN), 0x2A);
        assert_eq!(linear_to_alaw(-8), 0x55);
    }

    #[test]
    fn encode_of_decode_is_identity() {
        for code in 0..=255u8 {
            // μ-law has two zeros (0xFF and 0x7F); both decode to 0 which encodes to 0xFF.
            if code != 0x7F {
                assert_eq!(linear_to_ulaw(ulaw_to_linear(code)), code, "ulaw {code:#04x}");
            }
            assert_eq!(linear_to_alaw(alaw_to_linear(code)), code, "alaw {code:#04x}");
        }
    }

    #[test]
    fn quantisation_error_is_bounded_by_the_segment_step() {
        for sample in (i16::MIN..=i16::MAX).step_by(7) {
            let u = ulaw_to_linear(linear_to_ulaw(sample)) as i32;
            let a = alaw_to_linear(linear_to_alaw(sample)) as i32;
            let s = sample as i32;
            // Steps double per segment; half a step of the top segment is 512 (μ) / 512 (A).
            let bound = (s.abs() / 16).max(16) + 1;
            assert!((u - s).abs() <= bound.max(1024) || s.abs() > 32000, "ulaw {s} -> {u}");
            assert!((a - s).abs() <= bound.max(1024) || s.abs() > 32000, "alaw {s} -> {a}");
            assert!((u - s).abs() <= s.abs() / 8 + 64, "ulaw {s} -> {u}");
            assert!((a - s).abs() <= s.abs() / 8 + 64, "alaw {s} -> {a}");
        }
    }

    #[test]
    fn round_trips_through_the_other_law_stay_within_one_step() {
        let mut identical = 0;
        for code in 0..=255u8 {
            let back = ulaw_to_alaw(alaw_to_ulaw(code));
            identical += (back == code) as u32;
            let (v, w) = (alaw_to_linear(code) as i32, alaw_to_linear(back) as i32);
            assert!((v - w).abs() <= v.abs() / 16 + 16, "alaw {code:#04x} -> {back:#04x}: {v} vs {w}");
            let back = alaw_to_ulaw(ulaw_to_alaw(code));
            let (v, w) = (ulaw_to_linear(code) as i32, ulaw_to_linear(back) as i32);
            assert!((v - w).abs() <= v.abs() / 8 + 16, "ulaw {code:#04x} -> {back:#04x}: {v} vs {w}");
        }
        // Most A-law codes have an exact μ-law twin and come back unchanged.
        assert!(identical >= 200, "{identical}");
    }

    #[test]
    fn transcoding_keeps_values_close() {
        for code in 0..=255u8 {
            let u = ulaw_to_linear(code) as i32;
            let a = alaw_to_linear(ulaw_to_alaw(code)) as i32;
            assert!((u - a).abs() <= u.abs() / 16 + 16, "ulaw {code:#04x}: {u} vs alaw {a}");
            assert!(u.signum() * a.signum() >= 0, "sign of {code:#04x}: {u} vs {a}");
            let a2 = alaw_to_linear(code) as i32;
            let u2 = ulaw_to_linear(alaw_to_ulaw(code)) as i32;
            assert!((a2 - u2).abs() <= a2.abs() / 16 + 16, "alaw {code:#04x}: {a2} vs ulaw {u2}");
        }
        assert_eq!(ulaw_to_alaw(ULAW_SILENCE), ALAW_SILENCE);
        assert_eq!(alaw_to_ulaw(ALAW_SILENCE), 0xFE); // A-law silence is +8, μ-law has +8 exactly
    }

    #[test]
    fn buffer_helpers() {
        let samples: Vec<i16> = (0..160).map(|i| ((i as f64 / 10.0).sin() * 12000.0) as i16).collect();
        let mut ulaw = Vec::new();
        encode_ulaw_samples(&samples, &mut ulaw);
        let mut alaw = ulaw.clone();
        ulaw_to_alaw_in_place(&mut alaw);
        let mut decoded_u = Vec::new();
        let mut decoded_a = Vec::new();
        decode_ulaw(&ulaw, &mut decoded_u);
        decode_alaw(&alaw, &mut decoded_a);
        for ((s, u), a) in samples.iter().zip(&decoded_u).zip(&decoded_a) {
            assert!((*s as i32 - *u as i32).abs() <= 400, "{s} {u}");
            assert!((*s as i32 - *a as i32).abs() <= 800, "{s} {a}");
        }
        let mut back = alaw.clone();
        alaw_to_ulaw_in_place(&mut back);
        let mut encoded_a = Vec::new();
        encode_alaw_samples(&samples, &mut encoded_a);
        assert_eq!(encoded_a.len(), 160);
    }
}
