//! Session timers (RFC 4028) at a call's setup: what the caller's INVITE asks for (422 below
//! the node's Min-SE), the headers of the node's 2xx, and what the callee's 2xx answered to the
//! node's own offer. The refresh/expiry schedule of each leg then runs in the connected phase
//! (`control::session_timer::SessionTimer`).

use rsip::Header;

use super::admission::Refuse;
pub(crate) use crate::sip::control::session_leg::LegTimer;
use crate::sip::control::session_timer::{self, SessionTimerError, TimerPolicy, TimerRequest, UacOffer, UasDecision};

/// The caller's leg: the timer the node's 2xx will set, or the refusal (400 for malformed
/// timer headers, 422 with the node's Min-SE for an interval below it).
pub(super) fn caller_timer(headers: &rsip::Headers, policy: &TimerPolicy) -> Result<LegTimer, Refuse> {
    let request = TimerRequest::from_headers(headers)
        .map_err(|error: SessionTimerError| Refuse::new(400, format!("session timer headers: {error}")))?;
    match session_timer::negotiate_uas(&request, policy) {
        UasDecision::Accept(negotiated) => {
            Ok(LegTimer { negotiated, min_se: request.min_se.unwrap_or(0).max(policy.min_se) })
        }
        UasDecision::TooSmall { min_se } => {
            let mut refuse = Refuse::new(
                session_timer::TOO_SMALL,
                format!("session interval below the node's Min-SE of {min_se} s"),
            );
            refuse.extra = session_timer::too_small_headers(min_se);
            Err(refuse)
        }
    }
}

/// The headers of the node's 2xx to the caller: `Supported: timer`, `Session-Expires` with the
/// refresher, and `Require: timer` when the caller refreshes (RFC 4028 section 9).
pub(crate) fn answer_headers(timer: &LegTimer) -> Vec<Header> {
    let mut headers = vec![Header::Supported(session_timer::OPTION_TAG.into())];
    headers.extend(timer.negotiated.uas_response_headers());
    headers
}

/// The callee's leg after its 2xx to the node's INVITE that carried `offer` (see
/// [`LegTimer::after_answer`]).
pub(super) fn callee_timer(offer: &UacOffer, answer: &rsip::Headers) -> LegTimer {
    LegTimer::after_answer(offer, answer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sip::control::header_values;
    use crate::sip::control::session_timer::{Negotiated, Refresher};

    fn headers(list: &[(&str, &str)]) -> rsip::Headers {
        list.iter().map(|(n, v)| Header::Other((*n).into(), (*v).into())).collect::<Vec<_>>().into()
    }

    #[test]
    fn the_caller_gets_422_below_the_min_se_and_400_for_garbage() {
        let policy = TimerPolicy::new(1800, 120);
        let Err(refuse) = caller_timer(&headers(&[("Session-Expires", "100")]), &policy) else { panic!("accepted") };
        assert_eq!(refuse.code, 422);
        assert_eq!(header_values(&refuse.extra.into(), "Min-SE")[0], "120");
        let Err(refuse) = caller_timer(&headers(&[("Session-Expires", "x")]), &policy) else { panic!("accepted") };
        assert_eq!(refuse.code, 400);
    }

    #[test]
    fn the_answer_to_the_caller_names_the_refresher() {
        let policy = TimerPolicy::default();
        let Ok(timer) =
            caller_timer(&headers(&[("Session-Expires", "600"), ("Min-SE", "300"), ("Supported", "timer")]), &policy)
        else {
            panic!("refused")
        };
        assert_eq!(timer.negotiated, Negotiated { interval: 600, refresher: Refresher::Uac, we_refresh: false });
        assert_eq!(timer.min_se, 300);
        let answer: rsip::Headers = answer_headers(&timer).into();
        assert_eq!(header_values(&answer, "Session-Expires")[0], "600;refresher=uac");
        assert_eq!(header_values(&answer, "Require")[0], "timer");
        assert_eq!(header_values(&answer, "Supported")[0], "timer");
    }

    #[test]
    fn a_callee_without_timers_is_refreshed_by_the_node() {
        let offer = UacOffer::new(&TimerPolicy::new(90, 90));
        let timer = callee_timer(&offer, &headers(&[]));
        assert_eq!(timer.negotiated, Negotiated { interval: 90, refresher: Refresher::Uac, we_refresh: true });
        let timer = callee_timer(&offer, &headers(&[("Session-Expires", "garbage")]));
        assert!(timer.negotiated.we_refresh);
        let timer = callee_timer(&offer, &headers(&[("Session-Expires", "120;refresher=uas")]));
        assert_eq!(timer.negotiated, Negotiated { interval: 120, refresher: Refresher::Uas, we_refresh: false });
    }
}
