//! Helpers the library's own tests share.

/// Whether a current-thread runtime still runs its other tasks while `work` waits for what
/// another thread holds: `hold` takes it there (a database's one writer: a slow disk) and
/// gives it back once the runtime has shown it runs its other tasks, or after 5 s. A `work` that
/// waits for it on the runtime's one thread keeps the runtime from showing that.
pub(crate) async fn runtime_runs_while_held<G>(
    hold: impl FnOnce() -> G + Send + 'static,
    work: impl Future<Output = ()> + Send + 'static,
) -> bool {
    let (held, holding) = std::sync::mpsc::channel();
    let (alive, runtime_alive) = std::sync::mpsc::channel::<()>();
    let holder = std::thread::spawn(move || {
        let guard = hold();
        held.send(()).unwrap();
        let seen = runtime_alive.recv_timeout(std::time::Duration::from_secs(5)).is_ok();
        drop(guard);
        seen
    });
    holding.recv().unwrap();
    let work = tokio::spawn(work);
    // The work runs meanwhile, up to waiting for what is held.
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let _ = alive.send(());
    let seen = holder.join().unwrap();
    work.await.unwrap();
    seen
}
