//! Many independent reads at once. An object store answers each request in milliseconds to
//! tens of milliseconds whatever its size, so reads that do not depend on each other (the
//! descriptions of new packs, the manifests and tombstones they point at) go out together;
//! one at a time, a few hundred took half a minute.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// Requests in flight at once.
pub const FETCHERS: usize = 16;

/// `f` of every item, [`FETCHERS`] at a time; the results in the items' order.
pub fn parallel<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    if items.len() <= 1 {
        return items.iter().map(f).collect();
    }
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<R>>> = Mutex::new((0..items.len()).map(|_| None).collect());
    std::thread::scope(|scope| {
        for _ in 0..FETCHERS.min(items.len()) {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(item) = items.get(i) else { break };
                let r = f(item);
                results.lock().unwrap()[i] = Some(r);
            });
        }
    });
    results
        .into_inner()
        .unwrap()
        .into_iter()
        .map(|r| r.expect("every item was done"))
        .collect()
}
