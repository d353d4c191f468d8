//! Waiting for another lease holder, collapsed per process and woken by Redis pub/sub.
//!
//! All leases of this process that wait on the same token key share one [`Waits::wait`]:
//! a single loop that looks at the key in Redis (token? lock still held?) and then
//! sleeps until either
//!
//! - the [subscriber](run_subscriber) hears the key's `ready` channel (the holder
//!   committed or aborted, possibly on another companion), or
//! - the re-check interval passes (the safety net for locks that expire without a
//!   message, and for messages lost while the subscription was down).
//!
//! The loop ends with [`WaitOutcome::Ready`] (a usable token is cached) or
//! [`WaitOutcome::LockFree`] (nobody holds the lock: the waiters race to take it), and
//! every waiter gets that outcome. Each waiter applies its own deadline around the
//! shared wait; when the last one gives up, the shared wait is dropped.
//!
//! The loop looks at Redis *after* its wake-up handle is registered, so a message
//! published between a waiter's own check and the start of the wait is not lost: it
//! leaves a permit in the key's [`Notify`].

use futures::StreamExt;
use futures::future::{BoxFuture, FutureExt, Shared};
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::Notify;

use crate::clock::Clock;
use crate::store::{self, CachedToken, Store, StoreError};

/// How a shared wait ended.
#[derive(Debug, Clone)]
pub enum WaitOutcome {
    /// A usable token is cached: answer it.
    Ready(CachedToken),
    /// Nobody holds the lock any more (the holder aborted or its lock expired).
    LockFree,
}

type WaitResult = Result<WaitOutcome, StoreError>;
type SharedWait = Shared<BoxFuture<'static, WaitResult>>;

/// One key's shared wait.
struct Entry {
    /// Tells this entry apart from a later one for the same key.
    id: u64,
    /// Woken by the subscriber when the key's `ready` channel fires.
    wake: Arc<Notify>,
    /// The wait loop, polled by whichever waiter gets there first.
    wait: SharedWait,
}

/// The shared waits of this process, by key hash tag.
pub struct Waits {
    /// In-progress waits, at most one per key.
    entries: Mutex<HashMap<String, Entry>>,
    /// Source of entry ids.
    next_id: AtomicU64,
    /// Where the wait loops look.
    store: Store,
    /// Decides whether a cached token is still usable.
    clock: Arc<dyn Clock>,
    /// How often a wait loop looks even without a wake-up.
    recheck: Duration,
}

impl std::fmt::Debug for Waits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Waits")
            .field("keys", &self.lock_entries().len())
            .field("recheck", &self.recheck)
            .finish_non_exhaustive()
    }
}

impl Waits {
    /// Creates an empty set of waits.
    pub fn new(store: Store, clock: Arc<dyn Clock>, recheck: Duration) -> Arc<Self> {
        Arc::new(Self {
            entries: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            store,
            clock,
            recheck,
        })
    }

    /// Waits until the key of `tag` has a usable token or a free lock, sharing the wait
    /// with the other waiters of this process. Has no deadline of its own: wrap it.
    pub fn wait(self: &Arc<Self>, tag: &str) -> Joined {
        let mut entries = self.lock_entries();
        let entry = entries.entry(tag.to_owned()).or_insert_with(|| {
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            let wake = Arc::new(Notify::new());
            let watch = KeyWatch {
                store: self.store.clone(),
                clock: Arc::clone(&self.clock),
                recheck: self.recheck,
                tag: tag.to_owned(),
                wake: Arc::clone(&wake),
            };
            let wait = watch.run(Arc::downgrade(self), id).boxed().shared();
            Entry { id, wake, wait }
        });
        Joined {
            wait: entry.wait.clone(),
            id: entry.id,
            tag: tag.to_owned(),
            waits: Arc::downgrade(self),
        }
    }

    /// Wakes the wait on the key of `tag`, if there is one (its holder committed or aborted).
    pub fn wake(&self, tag: &str) {
        if let Some(entry) = self.lock_entries().get(tag) {
            entry.wake.notify_one();
        }
    }

    /// Wakes every wait (after the subscription was re-established: messages may be lost).
    pub fn wake_all(&self) {
        for entry in self.lock_entries().values() {
            entry.wake.notify_one();
        }
    }

    /// How many keys are being waited on.
    pub fn len(&self) -> usize {
        self.lock_entries().len()
    }

    /// Whether no key is being waited on.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn remove(&self, tag: &str, id: u64) {
        let mut entries = self.lock_entries();
        if entries.get(tag).is_some_and(|entry| entry.id == id) {
            entries.remove(tag);
        }
    }

    fn lock_entries(&self) -> MutexGuard<'_, HashMap<String, Entry>> {
        // The map stays consistent even if a holder panicked: every update is one insert
        // or remove.
        self.entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// What one key's wait loop needs; owned by the loop, so it does not keep [`Waits`] alive.
struct KeyWatch {
    /// Where to look.
    store: Store,
    /// Decides whether the cached token is still usable.
    clock: Arc<dyn Clock>,
    /// How long to sleep between looks without a wake-up.
    recheck: Duration,
    /// The key's hash tag.
    tag: String,
    /// Fired by the subscriber when the key's `ready` channel is published.
    wake: Arc<Notify>,
}

impl KeyWatch {
    /// The loop behind one key's shared wait; leaves `waits` when it ends.
    async fn run(self, waits: Weak<Waits>, id: u64) -> WaitResult {
        let result = loop {
            match self.store.peek(&self.tag).await {
                Err(e) => break Err(e),
                Ok(peek) => {
                    let now_ms = self.clock.now_ms();
                    if let Some(token) = peek.token.filter(|t| t.is_usable(now_ms)) {
                        break Ok(WaitOutcome::Ready(token));
                    }
                    if !peek.lock_held {
                        break Ok(WaitOutcome::LockFree);
                    }
                }
            }
            tokio::select! {
                () = self.wake.notified() => {}
                () = tokio::time::sleep(self.recheck) => {}
            }
        };
        // Leave the map before answering, so a lease arriving from now on starts a fresh
        // wait instead of reading this (soon stale) outcome.
        if let Some(waits) = waits.upgrade() {
            waits.remove(&self.tag, id);
        }
        result
    }
}

/// A waiter's share of a key's wait. Dropping the last share drops the wait.
pub struct Joined {
    /// This waiter's handle on the shared loop.
    wait: SharedWait,
    /// Which entry this share belongs to, to clean up only that one.
    id: u64,
    /// The key's hash tag.
    tag: String,
    /// The set to clean up on drop.
    waits: Weak<Waits>,
}

impl std::fmt::Debug for Joined {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Joined")
            .field("id", &self.id)
            .field("tag", &self.tag)
            .finish()
    }
}

impl Future for Joined {
    type Output = WaitResult;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<WaitResult> {
        Pin::new(&mut self.wait).poll(cx)
    }
}

impl Drop for Joined {
    fn drop(&mut self) {
        let Some(waits) = self.waits.upgrade() else {
            return;
        };
        let mut entries = waits.lock_entries();
        // The map holds one share and this waiter another: if those are all, this was the
        // last waiter and the loop would run for nobody. (`None`: the loop finished and
        // already removed itself.)
        let last = entries
            .get(&self.tag)
            .is_some_and(|entry| entry.id == self.id && self.wait.strong_count() == Some(2));
        if last {
            entries.remove(&self.tag);
        }
    }
}

/// Keeps one `PSUBSCRIBE tokengate:*:ready` open and turns its messages into wake-ups.
///
/// Reconnects with backoff when the connection fails; after each (re)subscription it
/// wakes every wait, since messages sent while it was down are lost. A ping every
/// `keepalive` detects a connection that died silently. Runs until its task is aborted.
pub async fn run_subscriber(
    client: redis::Client,
    waits: Arc<Waits>,
    timeout: Duration,
    keepalive: Duration,
) {
    const MIN_BACKOFF: Duration = Duration::from_millis(100);
    const MAX_BACKOFF: Duration = Duration::from_secs(5);
    let mut backoff = MIN_BACKOFF;
    let mut failures: u32 = 0;
    loop {
        match subscribe(&client, timeout).await {
            Ok(pubsub) => {
                tracing::info!(
                    pattern = store::READY_PATTERN,
                    "subscribed to commit notifications"
                );
                backoff = MIN_BACKOFF;
                failures = 0;
                waits.wake_all();
                let reason = pump(pubsub, &waits, timeout, keepalive).await;
                tracing::warn!(
                    reason,
                    "commit notifications lost; waiters fall back to re-checking until resubscribed"
                );
            }
            Err(e) => {
                failures += 1;
                // Say it once loudly, then quietly: Redis being down is also reported by
                // every request that needs it.
                if failures == 1 {
                    tracing::warn!(error = %e, "cannot subscribe to commit notifications; retrying");
                } else {
                    tracing::debug!(error = %e, failures, "still cannot subscribe to commit notifications");
                }
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

async fn subscribe(
    client: &redis::Client,
    timeout: Duration,
) -> Result<redis::aio::PubSub, StoreError> {
    let attempt = async {
        let mut pubsub = client.get_async_pubsub().await?;
        pubsub.psubscribe(store::READY_PATTERN).await?;
        Ok::<_, redis::RedisError>(pubsub)
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(result) => result.map_err(StoreError::from),
        Err(_) => Err(StoreError::Timeout(timeout)),
    }
}

/// Forwards messages until the connection ends; returns why it ended.
async fn pump(
    pubsub: redis::aio::PubSub,
    waits: &Waits,
    timeout: Duration,
    keepalive: Duration,
) -> &'static str {
    let (mut sink, mut messages) = pubsub.split();
    let mut ping = tokio::time::interval(keepalive);
    ping.tick().await; // the first tick is immediate
    loop {
        tokio::select! {
            message = messages.next() => match message {
                Some(message) => match store::tag_of_ready_channel(message.get_channel_name()) {
                    Some(tag) => waits.wake(tag),
                    None => tracing::debug!(channel = message.get_channel_name(), "ignoring message on unexpected channel"),
                },
                None => return "connection closed",
            },
            _ = ping.tick() => {
                match tokio::time::timeout(timeout, sink.ping::<String>()).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(_)) => return "ping failed",
                    Err(_) => return "ping timed out",
                }
            }
        }
    }
}
