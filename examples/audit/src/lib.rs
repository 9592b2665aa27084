//! Counts every pipeline event per subject in kv (`count/<subject>`): wildcard subscriptions.
//! Events of one domain (the subject's first token) run one at a time (`order_by_token = 0`):
//! every event of a subject writes the same counter, and run side by side their kv
//! transactions would conflict and run again and again.
use plugbus_sdk::{Event, HandlerError, handler, kv, log};

#[handler(subscribe = ["orders.>", "inventory.*", "payments.*", "shipping.*"], order_by_token = 0)]
fn audit(ev: Event) -> Result<(), HandlerError> {
    let key = format!("count/{}", ev.subject());
    let n = kv::get_json::<u64>(&key)?.unwrap_or(0) + 1;
    kv::set_json(&key, &n)?;
    log::debug(format!("{} #{n}: event {}", ev.subject(), ev.id()));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::audit;
    use plugbus_sdk::{Event, testing::TestHost};

    #[test]
    fn counts_each_subject_separately() {
        let mut host = TestHost::new();
        for subject in ["orders.created", "payments.captured", "orders.created"] {
            assert_eq!(host.run(audit, Event::new(subject, "{}")).result, Ok(()));
        }
        assert_eq!(host.kv().get_json::<u64>("count/orders.created"), Some(2));
        assert_eq!(host.kv().get_json::<u64>("count/payments.captured"), Some(1));
    }
}
