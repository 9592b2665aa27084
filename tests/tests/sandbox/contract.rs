//! Contract versions checked at load: a component built against a contract this host does not
//! speak is refused with both versions named; one that declares none (an older SDK) loads with
//! a warning; `plugbus inspect` shows what a component declares.

use plugbus_tests::{Logs, patch_bytes, plugbus_bin, wasm};
use std::process::Command;

/// The SDK writes the contract line right after the section's name: patching the pair keeps
/// the rodata copy of the text (the SDK's constant) out of the match.
const SECTION_0_1: &str = "plugbus-contractplugbus:handler@0.1.1 plugbus-sdk@0.1.0";

async fn host_on(dir: &std::path::Path) -> plugbus::Host {
    plugbus::Host::start(plugbus::Config {
        data_dir: dir.join("data"),
        plugins_dir: dir.to_path_buf(),
        ..Default::default()
    })
    .await
    .expect("the host starts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_component_of_another_contract_version_is_refused_naming_both() {
    let logs = Logs::capture();
    let echo = std::fs::read(wasm("echo")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // A build against contract 0.2 (its imports still resolve: only the declaration tells).
    let newer = "plugbus-contractplugbus:handler@0.2.0 plugbus-sdk@0.2.0";
    std::fs::write(dir.join("echo.wasm"), patch_bytes(&echo, SECTION_0_1, newer)).unwrap();
    // A build from before the SDK declared its contract: the section is not there by that name.
    let older = "plugbus-contracxplugbus:handler@0.1.0 plugbus-sdk@0.1.0";
    std::fs::write(dir.join("audit.wasm"), patch_bytes(&std::fs::read(wasm("audit")).unwrap(), SECTION_0_1, older))
        .unwrap();

    let host = host_on(dir).await;
    let rejected = host.rejected();
    assert_eq!(rejected.len(), 1, "{rejected:?}");
    assert_eq!(rejected[0].path.file_name().unwrap(), "echo.wasm");
    assert!(
        rejected[0].reason.contains("built against plugbus contract 0.2 (plugbus-sdk 0.2.0), this host speaks 0.1"),
        "{}",
        rejected[0].reason
    );
    assert_eq!(host.router().names(), vec!["audit".to_string()], "the undeclared build loads");
    let warned = logs
        .with_fields(&[("plugin", "audit")])
        .into_iter()
        .any(|l| l["level"] == "WARN" && l["fields"]["message"].as_str().unwrap_or("").contains("no plugbus contract"));
    assert!(warned, "no warning about audit's missing contract version");
    host.shutdown().await;
}

#[test]
fn inspect_shows_the_contract_version() {
    let out = Command::new(plugbus_bin()).arg("inspect").arg(wasm("echo")).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("contract   plugbus contract 0.1.1 (plugbus-sdk 0.1.0) (this host speaks 0.1.1)"), "{text}");

    let tmp = tempfile::tempdir().unwrap();
    let newer = tmp.path().join("echo.wasm");
    let bytes = std::fs::read(wasm("echo")).unwrap();
    std::fs::write(&newer, patch_bytes(&bytes, SECTION_0_1, "plugbus-contractplugbus:handler@0.2.0 plugbus-sdk@0.2.0"))
        .unwrap();
    let out = Command::new(plugbus_bin()).args(["inspect", "--json"]).arg(&newer).output().unwrap();
    assert!(!out.status.success());
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let problems = report["problems"].to_string();
    assert!(problems.contains("built against plugbus contract 0.2"), "{problems}");
}
