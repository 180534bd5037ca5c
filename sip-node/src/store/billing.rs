//! Billing arithmetic of a CDR: billable time and cost, exact decimals.

use chrono::{DateTime, Utc};
use rust_decimal::{Decimal, RoundingStrategy};

/// Decimal places of a stored cost (the `cdrs.cost` column is `NUMERIC(14, 6)`).
pub const COST_SCALE: u32 = 6;

/// Billable seconds of a call answered at `answer_at` and ended at `end_at`: the talk time
/// rounded up to whole seconds (a call of 10.001 s bills 11 s), 0 when the call was never
/// answered or the clock says it ended before it was answered. Saturates at `u32::MAX`.
pub fn billable_seconds(answer_at: Option<DateTime<Utc>>, end_at: DateTime<Utc>) -> u32 {
    let Some(answer_at) = answer_at else {
        return 0;
    };
    let talk = end_at - answer_at;
    if talk <= chrono::TimeDelta::zero() {
        return 0;
    }
    let whole = talk.num_seconds();
    let seconds = if talk.subsec_nanos() > 0 { whole.saturating_add(1) } else { whole };
    u32::try_from(seconds).unwrap_or(u32::MAX)
}

/// Cost of `billable_seconds` at `rate_per_minute`, billed per second: `rate × seconds / 60`,
/// exact, rounded to 6 decimal places (scale 6) with halves rounded up (away from zero), not to
/// even.
/// Saturates at `Decimal::MAX` (unreachable with rates that fit the database's `NUMERIC(12, 6)`).
pub fn cdr_cost(rate_per_minute: Decimal, billable_seconds: u32) -> Decimal {
    let cost = rate_per_minute
        .checked_mul(Decimal::from(billable_seconds))
        .and_then(|total| total.checked_div(Decimal::from(60)))
        .unwrap_or(Decimal::MAX);
    let mut cost = cost.round_dp_with_strategy(COST_SCALE, RoundingStrategy::MidpointAwayFromZero);
    // Always 6 places, as stored: 3 → 3.000000.
    cost.rescale(COST_SCALE);
    cost
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeDelta;
    use std::str::FromStr;

    fn dec(text: &str) -> Decimal {
        Decimal::from_str(text).expect("decimal")
    }

    #[test]
    fn billable_seconds_round_up_and_ignore_unanswered_calls() {
        let answer = Utc::now();
        assert_eq!(billable_seconds(None, answer), 0);
        assert_eq!(billable_seconds(Some(answer), answer), 0);
        assert_eq!(billable_seconds(Some(answer), answer - TimeDelta::seconds(3)), 0);
        assert_eq!(billable_seconds(Some(answer), answer + TimeDelta::nanoseconds(1)), 1);
        assert_eq!(billable_seconds(Some(answer), answer + TimeDelta::seconds(10)), 10);
        assert_eq!(billable_seconds(Some(answer), answer + TimeDelta::milliseconds(10_001)), 11);
        assert_eq!(billable_seconds(Some(answer), answer + TimeDelta::milliseconds(59_999)), 60);
        assert_eq!(billable_seconds(Some(answer), answer + TimeDelta::days(365 * 200)), u32::MAX);
    }

    #[test]
    fn cost_is_per_second_and_exact() {
        assert_eq!(cdr_cost(dec("0.012"), 60), dec("0.012"));
        assert_eq!(cdr_cost(dec("0.012"), 0), Decimal::ZERO);
        assert_eq!(cdr_cost(dec("0.012"), 1), dec("0.0002"));
        assert_eq!(cdr_cost(dec("0.012"), 90), dec("0.018"));
        // 0.01 / 60 × 7 = 0.0011666… → 0.001167
        assert_eq!(cdr_cost(dec("0.01"), 7), dec("0.001167"));
        // 0.01 / 60 × 1 = 0.000166666… → 0.000167
        assert_eq!(cdr_cost(dec("0.01"), 1), dec("0.000167"));
        // a large rate and a long call stay exact
        assert_eq!(cdr_cost(dec("999999.999999"), u32::MAX), dec("71582788249928.417212"));
        assert_eq!(cdr_cost(dec("0.05"), 3600).to_string(), "3.000000");
    }

    #[test]
    fn halves_round_up_not_to_even() {
        // 0.00003 × 1 / 60 = 0.0000005 exactly: half up gives 0.000001, banker's would give 0.
        assert_eq!(cdr_cost(dec("0.00003"), 1), dec("0.000001"));
        // 0.00009 / 60 × 1 = 0.0000015 → 0.000002 (banker's rounding would also give 0.000002)
        assert_eq!(cdr_cost(dec("0.00009"), 1), dec("0.000002"));
        // 0.00015 / 60 × 1 = 0.0000025 → 0.000003 (banker's rounding would give 0.000002)
        assert_eq!(cdr_cost(dec("0.00015"), 1), dec("0.000003"));
    }
}
