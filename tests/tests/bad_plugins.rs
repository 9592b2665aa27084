//! Files in the plugins folder that are not plugins: reported by name and reason, never fatal.

use plugbus_tests::wasm;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_files_are_reported_and_the_good_plugin_serves() {
    let good = std::fs::read(wasm("audit")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    std::fs::write(dir.join("audit.wasm"), &good).unwrap();
    std::fs::write(dir.join("empty.wasm"), b"").unwrap();
    std::fs::write(dir.join("random.wasm"), (0..4096u32).map(|i| (i * 7919 % 251) as u8).collect::<Vec<_>>()).unwrap();
    std::fs::write(dir.join("notes.wasm"), b"this is a text file, not wasm").unwrap();
    std::fs::write(dir.join("core.wasm"), b"\0asm\x01\0\0\0").unwrap();
    std::fs::write(dir.join("truncated.wasm"), &good[..good.len() / 2]).unwrap();
    std::fs::copy(wasm("sneaky"), dir.join("sneaky.wasm")).unwrap();
    std::fs::write(dir.join("readme.txt"), b"not a .wasm file: ignored").unwrap();

    let host = plugbus::Host::start(plugbus::Config {
        data_dir: dir.join("data"),
        plugins_dir: dir.clone(),
        http: None,
        ..Default::default()
    })
    .await
    .expect("the host starts despite bad files");
    let rejected = host.rejected();
    let reason = |file: &str| {
        rejected
            .iter()
            .find(|r| r.path.file_name().unwrap() == file)
            .unwrap_or_else(|| panic!("{file} not reported: {rejected:?}"))
            .reason
            .clone()
    };
    assert_eq!(rejected.len(), 6, "{rejected:?}");
    assert!(reason("empty.wasm").contains("empty"));
    assert!(reason("random.wasm").contains("not a WebAssembly file"));
    assert!(reason("notes.wasm").contains("not a WebAssembly file"));
    assert!(reason("core.wasm").contains("core WebAssembly module, not a component"));
    assert!(reason("truncated.wasm").contains("invalid component"));
    let sneaky = reason("sneaky.wasm");
    assert!(sneaky.contains("wasi:sockets/tcp@") && sneaky.contains("wasi:filesystem/preopens@"), "{sneaky}");
    assert_eq!(host.router().names(), vec!["audit".to_string()]);

    let mut seen = host.observe(&["orders.>"]).await.unwrap();
    host.publish(plugbus::Event::new("orders.created", "{}")).await.unwrap();
    seen.recv().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_under_another_name_is_refused_naming_both_and_the_original_serves() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    std::fs::copy(wasm("audit"), dir.join("audit.wasm")).unwrap();
    // Sorts before `audit.wasm`: by its manifest it once took the name `audit` first.
    std::fs::copy(wasm("audit"), dir.join("audit-copy.wasm")).unwrap();
    let host = plugbus::Host::start(plugbus::Config {
        data_dir: dir.join("data"),
        plugins_dir: dir,
        http: None,
        ..Default::default()
    })
    .await
    .unwrap();
    let rejected = host.rejected();
    assert_eq!(rejected.len(), 1);
    assert!(rejected[0].path.ends_with("audit-copy.wasm"), "{rejected:?}");
    assert!(rejected[0].reason.contains("\"audit\"") && rejected[0].reason.contains("\"audit-copy\""), "{rejected:?}");
    assert_eq!(host.router().names(), vec!["audit".to_string()]);
}
