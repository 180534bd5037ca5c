//! What the relay keeps per stream: the [`StreamRewriter`] that makes what a leg receives one
//! continuous stream, and the sequence statistics (loss, reordering) of what a leg sends.

use std::time::Instant;

use super::{MAX_DROPOUT, MAX_MISORDER};

/// The outcome of [`StreamRewriter::rewrite`]: the header fields to put on the relayed packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rewritten {
    /// Output sequence number.
    pub sequence: u16,
    /// Output timestamp.
    pub timestamp: u32,
    /// Output SSRC (constant for the life of the rewriter).
    pub ssrc: u32,
    /// Marker bit: the input's, or set on the first packet after a source change so that the
    /// receiver resynchronises its jitter buffer.
    pub marker: bool,
    /// Whether this packet started a new input segment.
    pub restarted: bool,
}

/// A rewriter's current segment, for whoever rewrites its packets elsewhere
/// ([`StreamRewriter::steady_segment`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SteadySegment {
    /// The input SSRC of the segment.
    pub in_ssrc: u32,
    /// Added to the input sequence number.
    pub seq_offset: u16,
    /// Added to the input timestamp.
    pub ts_offset: u32,
    /// The highest input sequence number so far.
    pub highest_in_seq: u16,
    /// The output timestamp of that packet.
    pub last_ts: u32,
}

#[derive(Debug, Clone, Copy)]
struct Segment {
    in_ssrc: u32,
    highest_in_seq: u16,
    seq_offset: u16,
    ts_offset: u32,
}

/// Rewrites the sequence numbers, timestamps and SSRC of a relayed stream so that what a leg
/// receives is one continuous stream from one SSRC, even when the source behind the relay
/// changes (re-INVITE to another media server, SSRC change, sequence restart) or the node
/// interleaves its own packets.
///
/// Within a segment (one input SSRC, sequence moving forward by less than [`MAX_DROPOUT`]) the
/// offsets stay fixed, so loss and reordering show through unchanged. A new segment continues
/// at the next output sequence number and at an output timestamp advanced by the wall-clock
/// time since the last packet, with the marker bit set.
#[derive(Debug, Clone)]
pub struct StreamRewriter {
    out_ssrc: u32,
    clock_rate: u32,
    segment: Option<Segment>,
    next_seq: u16,
    last_ts: u32,
    last_at: Option<Instant>,
    force_restart: bool,
}

impl StreamRewriter {
    /// A rewriter that emits `out_ssrc` at `clock_rate` Hz (8000 for G.711).
    pub fn new(out_ssrc: u32, clock_rate: u32) -> StreamRewriter {
        StreamRewriter {
            out_ssrc,
            clock_rate,
            segment: None,
            next_seq: rand::random(),
            last_ts: rand::random(),
            last_at: None,
            force_restart: false,
        }
    }

    /// The output SSRC.
    pub fn ssrc(&self) -> u32 {
        self.out_ssrc
    }

    /// Makes the next packet start a new segment even with the same SSRC (after a re-INVITE,
    /// when the source may have restarted its numbering).
    pub fn reset(&mut self) {
        self.force_restart = true;
    }

    fn advance(&mut self, now: Instant, min_samples: u32) -> u32 {
        let elapsed = self.last_at.map_or(0, |at| now.saturating_duration_since(at).as_micros() as u64);
        let samples = (elapsed * self.clock_rate as u64 / 1_000_000).min(u32::MAX as u64 / 2) as u32;
        self.last_ts.wrapping_add(samples.max(min_samples))
    }

    /// Maps one input packet to its output header fields.
    pub fn rewrite(&mut self, ssrc: u32, sequence: u16, timestamp: u32, marker: bool, now: Instant) -> Rewritten {
        let continuing = match self.segment {
            Some(segment) if !self.force_restart && segment.in_ssrc == ssrc => {
                let ahead = sequence.wrapping_sub(segment.highest_in_seq);
                !(MAX_DROPOUT..=u16::MAX - MAX_MISORDER).contains(&ahead)
            }
            _ => false,
        };
        if continuing && let Some(segment) = &mut self.segment {
            let ahead = sequence.wrapping_sub(segment.highest_in_seq);
            let out_seq = sequence.wrapping_add(segment.seq_offset);
            let out_ts = timestamp.wrapping_add(segment.ts_offset);
            if ahead != 0 && ahead < MAX_DROPOUT {
                segment.highest_in_seq = sequence;
                self.next_seq = out_seq.wrapping_add(1);
                self.last_ts = out_ts;
                self.last_at = Some(now);
            }
            return Rewritten { sequence: out_seq, timestamp: out_ts, ssrc: self.out_ssrc, marker, restarted: false };
        }
        // A new segment: continue the output where it stopped.
        let out_seq = self.next_seq;
        let out_ts = if self.last_at.is_some() { self.advance(now, 1) } else { self.last_ts };
        self.segment = Some(Segment {
            in_ssrc: ssrc,
            highest_in_seq: sequence,
            seq_offset: out_seq.wrapping_sub(sequence),
            ts_offset: out_ts.wrapping_sub(timestamp),
        });
        self.force_restart = false;
        self.next_seq = out_seq.wrapping_add(1);
        self.last_ts = out_ts;
        self.last_at = Some(now);
        Rewritten { sequence: out_seq, timestamp: out_ts, ssrc: self.out_ssrc, marker: true, restarted: true }
    }

    /// The current segment, when packets of it can be rewritten by someone else with fixed
    /// offsets (the kernel fast path): `None` before the first packet, after the node's own
    /// packets and while a restart is pending.
    pub fn steady_segment(&self) -> Option<SteadySegment> {
        let segment = self.segment.filter(|_| !self.force_restart)?;
        Some(SteadySegment {
            in_ssrc: segment.in_ssrc,
            seq_offset: segment.seq_offset,
            ts_offset: segment.ts_offset,
            highest_in_seq: segment.highest_in_seq,
            last_ts: self.last_ts,
        })
    }

    /// Catches up with packets of the current segment rewritten elsewhere (the kernel fast
    /// path) up to input sequence `highest_in_seq`, whose output timestamp was `last_ts`, at
    /// `at`: the next segment then continues after them.
    pub fn forwarded_elsewhere(&mut self, highest_in_seq: u16, last_ts: u32, at: Instant) {
        let Some(segment) = &mut self.segment else { return };
        let ahead = highest_in_seq.wrapping_sub(segment.highest_in_seq);
        if ahead == 0 || ahead >= MAX_DROPOUT {
            return;
        }
        segment.highest_in_seq = highest_in_seq;
        self.next_seq = highest_in_seq.wrapping_add(segment.seq_offset).wrapping_add(1);
        self.last_ts = last_ts;
        self.last_at = Some(at);
    }

    /// Header fields for a packet the node generates itself (`samples` long), continuing the
    /// same output stream: the next sequence number and a timestamp that follows real time
    /// across pauses. The relayed segment, if any, ends: the next relayed packet starts anew.
    pub fn next_own(&mut self, samples: u32, now: Instant) -> Rewritten {
        let gap = self.last_at.is_none_or(|at| {
            now.saturating_duration_since(at).as_micros() as u64 * self.clock_rate as u64
                > 2 * samples.max(1) as u64 * 1_000_000
        });
        let out_ts = match self.last_at {
            None => self.last_ts,
            Some(_) if gap => self.advance(now, samples),
            Some(_) => self.last_ts.wrapping_add(samples),
        };
        let out_seq = self.next_seq;
        self.segment = None;
        self.next_seq = out_seq.wrapping_add(1);
        self.last_ts = out_ts;
        self.last_at = Some(now);
        Rewritten { sequence: out_seq, timestamp: out_ts, ssrc: self.out_ssrc, marker: gap, restarted: false }
    }
}

/// How one received packet relates to the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SequenceClass {
    /// The first packet, or the next expected one.
    InOrder,
    /// Ahead of the expected one: this many packets are missing (so far).
    Gap(u16),
    /// Behind the highest seen (reordered, or a duplicate).
    Late,
    /// A jump too large to be loss: the source restarted (counted as neither).
    Restart,
}

/// Loss and reordering counters for one received stream (RFC 3550 appendix A.1, simplified).
#[derive(Debug, Clone, Default)]
pub struct SequenceStats {
    highest: Option<(u32, u16)>,
    /// Packets seen.
    pub received: u64,
    /// Packets missing (gaps, minus late packets that filled them).
    pub lost: u64,
    /// Packets that arrived behind a later one.
    pub late: u64,
    /// Restarts seen.
    pub restarts: u64,
}

impl SequenceStats {
    /// Counts packets of the current stream that were received elsewhere (the kernel fast
    /// path) up to `highest`, so that the next one seen here is not taken for a gap.
    pub fn received_elsewhere(&mut self, highest: u16, packets: u64, lost: u64, late: u64) {
        if let Some((ssrc, current)) = self.highest {
            let ahead = highest.wrapping_sub(current);
            if ahead != 0 && ahead < MAX_DROPOUT {
                self.highest = Some((ssrc, highest));
            }
        }
        self.received += packets;
        self.lost += lost;
        self.late += late;
    }

    /// Records one packet of `ssrc`; a new SSRC starts the sequence over.
    pub fn record(&mut self, ssrc: u32, sequence: u16) -> SequenceClass {
        self.received += 1;
        let Some((last_ssrc, highest)) = self.highest else {
            self.highest = Some((ssrc, sequence));
            return SequenceClass::InOrder;
        };
        if last_ssrc != ssrc {
            self.highest = Some((ssrc, sequence));
            self.restarts += 1;
            return SequenceClass::Restart;
        }
        let ahead = sequence.wrapping_sub(highest);
        if ahead == 1 {
            self.highest = Some((ssrc, sequence));
            SequenceClass::InOrder
        } else if ahead != 0 && ahead < MAX_DROPOUT {
            self.highest = Some((ssrc, sequence));
            self.lost += (ahead - 1) as u64;
            SequenceClass::Gap(ahead - 1)
        } else if ahead == 0 || ahead > u16::MAX - MAX_MISORDER {
            self.late += 1;
            self.lost = self.lost.saturating_sub(1);
            SequenceClass::Late
        } else {
            self.highest = Some((ssrc, sequence));
            self.restarts += 1;
            SequenceClass::Restart
        }
    }
}
