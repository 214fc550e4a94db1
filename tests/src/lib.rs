//! Cross-crate tests live in `tests/`; this library holds what several of them share.
#![cfg_attr(not(fuzzing), warn(missing_docs))]

/// Lets the other tasks of the executor run once, whatever the runtime.
pub async fn yield_now() {
    let mut yielded = false;
    std::future::poll_fn(|cx| {
        if yielded {
            std::task::Poll::Ready(())
        } else {
            yielded = true;
            cx.waker().wake_by_ref();
            std::task::Poll::Pending
        }
    })
    .await;
}

/// Runs `f` on a fresh tokio runtime with two workers, as the scenario tests do on tokio.
///
/// # Panics
/// When the runtime cannot be built.
pub fn tokio_block_on<F: Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime")
        .block_on(f)
}
