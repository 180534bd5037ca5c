//! The two-leg relay's side of the kernel fast path ([`crate::media::kernel`]): a direction is
//! installed in the kernel while it is steady, and whatever the kernel forwarded is folded back
//! into the relay (counters, the media timeout's clock, both streams' sequence state) before
//! user space handles a packet of that direction again, at an update and at the end.

use std::net::IpAddr;
use std::sync::Arc;

use switchboard_model::Codec;

use super::two_leg::Relay;
use super::{LegId, bump};
use crate::media::kernel::{ForwardEntry, ForwardKey, ForwardRule, KernelForwarder, Transcode, instant_of, ipv4_of};
use crate::media::rtp::SteadySegment;

/// A relay direction forwarded in the kernel: its key, the rule installed and the entry's
/// state as last folded into the relay's counters.
pub(super) struct Offloaded {
    key: ForwardKey,
    rule: ForwardRule,
    seen: ForwardEntry,
}

impl Relay {
    /// The relay's keys in the kernel fast path, by receiving leg.
    pub(crate) fn kernel_keys(&self) -> [Option<ForwardKey>; 2] {
        [&self.a, &self.b].map(|leg| leg.local_rtp.and_then(ForwardKey::of))
    }

    /// The call removed this relay's kernel entries itself (an update is coming): folds in their
    /// last state and forgets them.
    pub(crate) fn kernel_released(&mut self, last: [Option<ForwardEntry>; 2]) {
        for (leg, last) in [LegId::A, LegId::B].into_iter().zip(last) {
            if let Some(last) = last {
                self.kernel_fold(leg, last);
            }
            self.offloaded[leg.index()] = None;
        }
    }

    /// Gives the engine's kernel fast path to this relay.
    pub(crate) fn use_kernel(&mut self, kernel: Option<Arc<KernelForwarder>>) {
        self.kernel = kernel;
    }

    /// What the kernel should do with RTP from `leg`, if the direction is steady: the peer
    /// latched, the node receives from it and sends to the other leg, both legs on PCMU or PCMA
    /// (transcoded in the kernel when they differ), one input stream with fixed offsets, IPv4.
    fn kernel_rule(&self, leg: LegId) -> Option<(ForwardKey, ForwardRule, SteadySegment)> {
        let (this, target) = match leg {
            LegId::A => (&self.a, &self.b),
            LegId::B => (&self.b, &self.a),
        };
        if !this.media.direction.receives() || !target.media.direction.sends() {
            return None;
        }
        // The kernel forwards plain RTP only: a leg that transforms its packets stays in user
        // space.
        if this.transform.is_some() || target.transform.is_some() {
            return None;
        }
        let transcode = match (this.media.codec, target.media.codec) {
            (from, to) if from == to => None,
            (Codec::Pcmu, Codec::Pcma) => Some(Transcode::UlawToAlaw),
            (Codec::Pcma, Codec::Pcmu) => Some(Transcode::AlawToUlaw),
            _ => return None,
        };
        let segment = target.rewriter.steady_segment()?;
        let key = ForwardKey::of(this.local_rtp?)?;
        let rule = ForwardRule {
            peer: ipv4_of(this.latched?)?,
            in_pt: this.media.payload_type,
            out_pt: target.media.payload_type,
            in_ssrc: segment.in_ssrc,
            out_ssrc: target.rewriter.ssrc(),
            seq_offset: segment.seq_offset,
            ts_offset: segment.ts_offset,
            from: ipv4_of(target.local_rtp?)?,
            to: ipv4_of(target.destination()?)?,
            local: false,
            transcode,
        };
        let local = rule.to.ip() == rule.from.ip() || self.kernel.as_ref().is_some_and(|k| k.is_local(*rule.to.ip()));
        let rule = ForwardRule { local, ..rule };
        Some((key, rule, segment))
    }

    /// After user space relayed a packet from `leg`: installs the direction in the kernel when
    /// it is steady and not installed as it is, removes it when it is no longer steady.
    pub(super) fn kernel_offload(&mut self, leg: LegId) {
        let Some(kernel) = self.kernel.clone() else { return };
        let wanted = self.kernel_rule(leg).map(|(_, rule, _)| rule);
        if wanted == self.offloaded[leg.index()].as_ref().map(|o| o.rule) {
            return;
        }
        // The state the kernel kept comes back first, so that the new entry starts from it.
        self.kernel_uninstall(leg);
        let Some((key, rule, segment)) = self.kernel_rule(leg) else { return };
        if !kernel.ready_for(IpAddr::V4(*rule.from.ip())) {
            // This address cannot be offloaded (the forwarder logged why, once).
            self.kernel_give_up();
            return;
        }
        let entry = rule.entry(segment.highest_in_seq, segment.last_ts);
        match kernel.install(key, entry) {
            Ok(()) => self.offloaded[leg.index()] = Some(Offloaded { key, rule, seen: entry }),
            Err(error) => {
                // A full map, most likely: this call stays in user space (one warning, not one
                // per packet).
                tracing::warn!(%error, "cannot install a kernel RTP forward; this call is relayed in user space");
                self.kernel_give_up();
            }
        }
    }

    /// Takes both directions back and relays this call in user space from now on.
    fn kernel_give_up(&mut self) {
        self.kernel_uninstall(LegId::A);
        self.kernel_uninstall(LegId::B);
        self.kernel = None;
    }

    /// Folds what the kernel forwarded from `leg` since the last look into the relay: counters,
    /// the time of the last packet (media timeout), the sequence state of both streams.
    pub(super) fn kernel_sync(&mut self, leg: LegId) {
        let (Some(kernel), Some(installed)) = (&self.kernel, &self.offloaded[leg.index()]) else { return };
        if let Some(entry) = kernel.read(&installed.key) {
            self.kernel_fold(leg, entry);
        }
    }

    fn kernel_fold(&mut self, leg: LegId, entry: ForwardEntry) {
        let Relay { a, b, counters, offloaded, kernel, .. } = self;
        let Some(installed) = &mut offloaded[leg.index()] else { return };
        let (this, target) = match leg {
            LegId::A => (a, b),
            LegId::B => (b, a),
        };
        let seen = std::mem::replace(&mut installed.seen, entry);
        let packets = entry.packets.wrapping_sub(seen.packets);
        if packets == 0 {
            return;
        }
        if let Some(kernel) = kernel {
            kernel.count_forwarded(packets);
        }
        let bytes = entry.bytes.wrapping_sub(seen.bytes);
        let (lost, late) = (entry.lost.wrapping_sub(seen.lost), entry.late.wrapping_sub(seen.late));
        let (from, to) = (&counters[this.id.index()], &counters[target.id.index()]);
        bump(&from.packets_in, packets);
        bump(&from.bytes_in, bytes);
        bump(&from.lost, lost);
        bump(&from.late, late);
        bump(&to.packets_out, packets);
        bump(&to.bytes_out, bytes);
        let at = instant_of(entry.last_ns).into();
        this.last_rx = this.last_rx.max(at);
        this.sequence.received_elsewhere(entry.highest_seq, packets, lost, late);
        target.rewriter.forwarded_elsewhere(entry.highest_seq, entry.last_out_ts, at.into_std());
    }

    /// Takes a direction back from the kernel (its last counters folded in).
    pub(super) fn kernel_uninstall(&mut self, leg: LegId) {
        let (Some(kernel), Some(installed)) = (&self.kernel, &self.offloaded[leg.index()]) else { return };
        if let Some(last) = kernel.remove(&installed.key) {
            self.kernel_fold(leg, last);
        }
        self.offloaded[leg.index()] = None;
    }
}

impl Drop for Relay {
    /// The kernel forgets the relay's directions before its ports go back (a port reused by
    /// another call must not be forwarded as this one's).
    fn drop(&mut self) {
        self.kernel_uninstall(LegId::A);
        self.kernel_uninstall(LegId::B);
    }
}
