//! What the loader holds for files it refuses while the plugins folder loads stays bounded.
//! Every file's result waited, uncut, until the last file was done: a refusal's text can be as
//! long as its file (here a declared SDK version of 4 MiB), so 100 links to one such file held
//! a copy or more of it each (review 60b H3; 201 files of 8 MiB grew RSS by 925 MiB here).

use crate::rss_mib;
use plugbus::Config;
use plugbus::kv::{KvStore, MemoryKv};
use plugbus_tests::{leb128, measuring_memory, wasm_section};
use std::sync::Arc;

const LINKS: usize = 100;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_with_texts_as_long_as_their_file_are_held_cut_while_the_folder_loads() {
    let _alone = measuring_memory().await;
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins");
    std::fs::create_dir(&plugins).unwrap();
    // A component's header and a `plugbus-contract` section of another contract, whose SDK
    // version goes on for 4 MiB after its `-` (a pre-release suffix is allowed).
    let mut body = Vec::new();
    let name = b"plugbus-contract";
    leb128(name.len(), &mut body);
    body.extend_from_slice(name);
    body.extend_from_slice(b"plugbus:handler@9.0.0 plugbus-sdk@0.1.0-");
    body.resize(body.len() + (4 << 20), b'a');
    let mut file = b"\0asm\x0d\0\x01\0".to_vec();
    wasm_section(0, &body, &mut file);
    std::fs::write(plugins.join("big.wasm"), &file).unwrap();
    for i in 0..LINKS {
        std::os::unix::fs::symlink(plugins.join("big.wasm"), plugins.join(format!("link{i:03}.wasm"))).unwrap();
    }
    drop((body, file));
    let config = Config { plugins_dir: plugins.clone(), data_dir: dir.path().join("data"), ..Config::default() };
    let sandbox = plugbus::loader::tool_sandbox(&config).unwrap();
    let kv: Arc<dyn KvStore> = Arc::new(MemoryKv::new());
    let before = rss_mib();
    let (loaded, rejected) = plugbus::loader::load_dir(&sandbox, &config, &kv).await.unwrap();
    let grown = rss_mib().saturating_sub(before);
    eprintln!("{} files refused for a 4 MiB declared version: RSS grew {grown} MiB", LINKS + 1);
    assert!(loaded.is_empty());
    assert_eq!(rejected.len(), LINKS + 1);
    assert!(rejected.iter().all(|r| r.reason.contains("built against plugbus contract 9")), "{:?}", &rejected[0]);
    assert!(rejected.iter().all(|r| r.reason.len() <= plugbus::loader::REASON_BYTES), "a reason kept whole");
    assert!(grown < 64, "{} refused files grew RSS by {grown} MiB", LINKS + 1);
}
