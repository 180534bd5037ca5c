//! Rate limits of the requests that cost money: `/api/calls/initiate` and `/api/sms/send`, per
//! token subject and per from-number, so that one leaked token or one abused number cannot place
//! thousands of calls before anyone looks. Token buckets in memory, per API process (a
//! deployment with several API replicas gets the limit per replica).
//!
//! Pure: every check takes the time as an argument, and the unit tests drive it with plain
//! instants.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Most keys kept per limiter; past it, buckets that have refilled completely (they hold no
/// information) are dropped, and if that is not enough the oldest are.
const MAX_KEYS: usize = 100_000;

/// A sustained rate with a burst.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Requests per minute, sustained.
    pub per_minute: f64,
    /// Requests allowed at once after a quiet period.
    pub burst: u32,
}

/// The limits of the money-spending routes.
#[derive(clap::Args, Debug, Clone)]
pub struct LimitArgs {
    /// Calls and messages one token subject may start per minute (each route its own budget).
    #[arg(long, env = "SWITCHBOARD_API_RATE_PER_SUBJECT", default_value_t = 60.0)]
    pub api_rate_per_subject: f64,
    /// Calls and messages one from-number may start per minute.
    #[arg(long, env = "SWITCHBOARD_API_RATE_PER_NUMBER", default_value_t = 20.0)]
    pub api_rate_per_number: f64,
    /// Requests allowed at once above the sustained rate.
    #[arg(long, env = "SWITCHBOARD_API_RATE_BURST", default_value_t = 10)]
    pub api_rate_burst: u32,
}

impl Default for LimitArgs {
    fn default() -> Self {
        LimitArgs { api_rate_per_subject: 60.0, api_rate_per_number: 20.0, api_rate_burst: 10 }
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// One token bucket per key.
#[derive(Debug)]
pub(crate) struct KeyedLimiter {
    rate: Rate,
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl KeyedLimiter {
    pub fn new(rate: Rate) -> Self {
        KeyedLimiter { rate, buckets: Mutex::default() }
    }

    /// Takes one request for `key` at `now`: `Ok` when allowed, else how long until it would be.
    pub fn check(&self, key: &str, now: Instant) -> Result<(), Duration> {
        let per_second = self.rate.per_minute / 60.0;
        let burst = f64::from(self.rate.burst.max(1));
        if per_second <= 0.0 {
            return Err(Duration::from_secs(60));
        }
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() >= MAX_KEYS && !buckets.contains_key(key) {
            let full = |b: &Bucket| b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * per_second >= burst;
            buckets.retain(|_, b| !full(b));
            if buckets.len() >= MAX_KEYS {
                // Everyone is active: drop the least recently used half.
                let mut ages: Vec<Instant> = buckets.values().map(|b| b.at).collect();
                ages.sort_unstable();
                let cut = ages[ages.len() / 2];
                buckets.retain(|_, b| b.at > cut);
            }
        }
        let bucket = buckets.entry(key.to_string()).or_insert(Bucket { tokens: burst, at: now });
        let refilled = (bucket.tokens + now.saturating_duration_since(bucket.at).as_secs_f64() * per_second).min(burst);
        bucket.at = now;
        if refilled >= 1.0 {
            bucket.tokens = refilled - 1.0;
            Ok(())
        } else {
            bucket.tokens = refilled;
            Err(Duration::from_secs_f64((1.0 - refilled) / per_second))
        }
    }
}

/// The limiters of one money-spending route: per subject and per from-number.
#[derive(Debug)]
pub(crate) struct RouteLimits {
    subject: KeyedLimiter,
    number: KeyedLimiter,
}

/// Which limit a request ran into.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Limited {
    pub what: &'static str,
    pub retry_after: Duration,
}

impl RouteLimits {
    pub fn new(args: &LimitArgs) -> Self {
        let rate = |per_minute| Rate { per_minute, burst: args.api_rate_burst };
        RouteLimits {
            subject: KeyedLimiter::new(rate(args.api_rate_per_subject)),
            number: KeyedLimiter::new(rate(args.api_rate_per_number)),
        }
    }

    /// Takes one request of `subject` from `from_number`. A request refused by the number's
    /// limit still used the subject's budget: retrying in a loop is not free.
    pub fn check(&self, subject: &str, from_number: &str, now: Instant) -> Result<(), Limited> {
        self.subject.check(subject, now).map_err(|retry_after| Limited { what: "token subject", retry_after })?;
        self.number.check(from_number, now).map_err(|retry_after| Limited { what: "from-number", retry_after })
    }
}

/// The limits of both routes.
#[derive(Debug)]
pub struct ApiLimits {
    pub(crate) calls: RouteLimits,
    pub(crate) sms: RouteLimits,
}

impl ApiLimits {
    pub fn new(args: &LimitArgs) -> Self {
        ApiLimits { calls: RouteLimits::new(args), sms: RouteLimits::new(args) }
    }
}

impl Default for ApiLimits {
    fn default() -> Self {
        ApiLimits::new(&LimitArgs::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_its_burst_then_the_rate() {
        let limiter = KeyedLimiter::new(Rate { per_minute: 60.0, burst: 3 });
        let t0 = Instant::now();
        for _ in 0..3 {
            limiter.check("a", t0).unwrap();
        }
        let wait = limiter.check("a", t0).unwrap_err();
        assert!(wait > Duration::from_millis(900) && wait <= Duration::from_secs(1), "{wait:?}");
        // Other keys have their own bucket.
        limiter.check("b", t0).unwrap();
        // One per second comes back.
        limiter.check("a", t0 + Duration::from_secs(1)).unwrap();
        assert!(limiter.check("a", t0 + Duration::from_secs(1)).is_err());
        // A long pause refills up to the burst, not beyond.
        let later = t0 + Duration::from_secs(3600);
        for _ in 0..3 {
            limiter.check("a", later).unwrap();
        }
        assert!(limiter.check("a", later).is_err());
    }

    #[test]
    fn subject_and_number_limit_independently() {
        let limits =
            RouteLimits::new(&LimitArgs { api_rate_per_subject: 60.0, api_rate_per_number: 60.0, api_rate_burst: 2 });
        let t0 = Instant::now();
        limits.check("alice", "+15550000001", t0).unwrap();
        limits.check("alice", "+15550000002", t0).unwrap();
        assert_eq!(limits.check("alice", "+15550000003", t0).unwrap_err().what, "token subject");
        limits.check("bob", "+15550000001", t0).unwrap();
        assert_eq!(limits.check("carol", "+15550000001", t0).unwrap_err().what, "from-number");
    }

    #[test]
    fn the_key_table_stays_bounded() {
        let limiter = KeyedLimiter::new(Rate { per_minute: 60.0, burst: 1 });
        let t0 = Instant::now();
        for i in 0..(MAX_KEYS + 10) {
            let _ = limiter.check(&i.to_string(), t0);
        }
        assert!(limiter.buckets.lock().unwrap().len() <= MAX_KEYS);
    }
}
