//! `plugbus dlq export`: a kept dead letter (an entry of `GET /v1/dlq`) back into the event
//! that failed, as a case line whose expectation is what the handler did (retry or reject), or
//! `ok` when the handler did not fail it (the host did, or it never ran).

use crate::cloudevents::{base64_decode, to_json};
use crate::deadletter::headers;
use crate::event::Event;
use serde_json::{Value, json};

/// The case line of one `GET /v1/dlq` entry: `{"event", "attempt", "expect": {"result"},
/// "dead_letter": {"plugin", "error", "attempts", "id"}}`. The error names what is missing.
pub fn case_from_entry(entry: &Value) -> Result<Value, String> {
    let dead = &entry["event"];
    let mut hdrs: Vec<(String, String)> = Vec::new();
    for pair in dead["headers"].as_array().ok_or("the dead letter has no `headers`")? {
        match (pair.get(0).and_then(Value::as_str), pair.get(1).and_then(Value::as_str)) {
            (Some(k), Some(v)) => hdrs.push((k.to_string(), v.to_string())),
            _ => return Err(format!("a header of the dead letter is not [name, value]: {pair}")),
        }
    }
    let header = |name: &str| hdrs.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    // A copy the broker kept without what did not fit (NATS's `max_payload`): its data, maybe
    // its headers, are gone, and a case made of it would test another event (review 61f F7).
    if let Some(omitted) = header(headers::DATA_OMITTED) {
        return Err(format!(
            "the dead letter was kept without part of its event ({}): the event that failed cannot be made \
             from it (the host that dead-lettered it keeps it whole)",
            crate::event::one_line_cut(&omitted, 512)
        ));
    }
    let subject = header(headers::ORIGINAL_SUBJECT).ok_or("the dead letter has no plugbus-original-subject")?;
    let text = |k: &str| dead[k].as_str().unwrap_or_default().to_string();
    let data = match dead["data_base64"].as_str() {
        Some(b64) => base64_decode(b64).ok_or("the dead letter's data_base64 is not valid base64")?,
        None => text("data").into_bytes(),
    };
    let mut ev = Event::new(subject, data);
    ev.id = header(headers::ORIGINAL_ID).unwrap_or_else(|| text("id"));
    // A dead letter from a host that did not record the source: the host's default one.
    ev.source = header(headers::ORIGINAL_SOURCE).unwrap_or_else(|| "plugbus".into());
    ev.ty = text("type");
    if ev.ty.is_empty() {
        ev.ty = ev.subject.clone();
    }
    ev.time = text("time");
    ev.datacontenttype = dead["datacontenttype"].as_str().map(str::to_owned);
    ev.extensions = hdrs.iter().filter(|(k, _)| !k.starts_with("plugbus-")).cloned().collect();
    let error = header(headers::ERROR).unwrap_or_default();
    let attempts: u32 = header(headers::ATTEMPTS).and_then(|a| a.parse().ok()).unwrap_or(1);
    // What failed it: the handler (the case expects that again until the handler is fixed) or
    // the host, the bus or the event's delivery (the handler is expected to handle it).
    let result = crate::fate::expected_of(&error);
    // (An attempt the host ended after keeping it waiting for a CPU expects a retry, and is the
    // host's: `fate::expected_of`.)
    let by_the_handler =
        result != "ok" && !error.starts_with("host error:") && !crate::fate::never_run_for_its_size(&error);
    Ok(json!({
        "event": to_json(&ev),
        "attempt": attempts.max(1),
        "expect": { "result": result },
        "dead_letter": {
            "plugin": entry["plugin"], "id": dead["id"], "error": error, "attempts": attempts,
            "failed_by_the_handler": by_the_handler,
        },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deadletter::{Entry, dead_letter_event};

    #[test]
    fn a_dead_letter_becomes_the_event_that_failed() {
        let mut original = Event::new("orders.created", r#"{"n":1}"#).with_header("tenant", "acme");
        original.source = "/shop".into();
        original.datacontenttype = Some("application/json".into());
        let failure = crate::sandbox::Failure::Reject("never".into()).to_string();
        let dead = dead_letter_event(&original, "faulty", "plugbus.dlq.faulty", &failure, 1);
        let entry = serde_json::to_value(Entry { seq: 1, plugin: "faulty".into(), event: dead, record: None }).unwrap();
        let case = case_from_entry(&entry).unwrap();
        assert_eq!(crate::cloudevents::from_json(&case["event"]).unwrap(), original);
        assert_eq!(case["expect"]["result"], "reject");
        assert_eq!(case["dead_letter"]["plugin"], "faulty");
        assert!(case_from_entry(&json!({"event": {"headers": []}})).unwrap_err().contains("original-subject"));
        // A broker's copy kept without its data is no event to test (review 61f F7).
        let omitted = json!({"event": {"headers": [["plugbus-original-subject", "orders.created"],
            ["plugbus-data-omitted", "data: they took it to 1048700 bytes"]], "data": ""}});
        let e = case_from_entry(&omitted).unwrap_err();
        assert!(e.contains("kept without part of its event (data: they took it"), "{e}");
        // One the host failed (its kv store did not commit): the handler is expected to handle it.
        let failure = crate::fate::DeliveryError::Kv("the event log is closed".into()).to_string();
        let dead = dead_letter_event(&original, "faulty", "plugbus.dlq.faulty", &failure, 5);
        let entry = serde_json::to_value(Entry { seq: 2, plugin: "faulty".into(), event: dead, record: None }).unwrap();
        let case = case_from_entry(&entry).unwrap();
        assert_eq!(case["expect"]["result"], "ok", "{case}");
        assert_eq!(case["dead_letter"]["failed_by_the_handler"], false);
        assert_eq!(case["attempt"], 5);
        // One the host ended after keeping it waiting for a CPU: a retry is expected (whether it
        // would have finished is not known), and the failure is still the host's.
        let starved = crate::sandbox::Failure::Host(format!("{}: it ran 3 ms", crate::sandbox::cpu_wait::STARVED));
        let failure = crate::fate::DeliveryError::of_attempt(starved).to_string();
        let dead = dead_letter_event(&original, "faulty", "plugbus.dlq.faulty", &failure, 3);
        let entry = serde_json::to_value(Entry { seq: 3, plugin: "faulty".into(), event: dead, record: None }).unwrap();
        let case = case_from_entry(&entry).unwrap();
        assert_eq!(case["expect"]["result"], "retry", "{case}");
        assert_eq!(case["dead_letter"]["failed_by_the_handler"], false, "{case}");
        // One over the plugin's `max_event_bytes`: never run, and `plugbus test` dead-letters it
        // unrun with the same limits, so it expects that (review 63c F8); not the handler's.
        let failure = crate::fate::DeliveryError::Oversize { bytes: 2 << 20, limit: 1 << 20 }.to_string();
        let dead = dead_letter_event(&original, "faulty", "plugbus.dlq.faulty", &failure, 1);
        let entry = serde_json::to_value(Entry { seq: 4, plugin: "faulty".into(), event: dead, record: None }).unwrap();
        let case = case_from_entry(&entry).unwrap();
        assert_eq!(case["expect"]["result"], "reject", "{case}");
        assert_eq!(case["dead_letter"]["failed_by_the_handler"], false, "{case}");
    }
}
