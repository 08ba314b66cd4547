//! Byte-bounded LRU caches: of merged blocks, and of the factors they are merged with.
//!
//! Readers of an entry that is being computed wait for that one computation instead of
//! starting their own; the lock is held only to look up and insert, never while computing.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use lru::LruCache;

use crate::error::{Error, Result};

/// (recipe id, block index in the tensor; 0 for a recipe's factors). A recipe id stands for
/// everything a tensor's bytes are computed from, file versions included (see
/// [`crate::engine::Recipe`]), so a key never refers to two different contents.
pub type BlockKey = (u32, u32);

pub type Block = Arc<Vec<u8>>;

/// What a cache holds: something that knows its size, and may give back a buffer to reuse
/// when evicted.
pub trait Weigh {
    fn bytes(&self) -> usize;
    /// The buffer to recycle for the next entry, if any.
    fn into_spare(self) -> Option<Vec<u8>>
    where
        Self: Sized,
    {
        None
    }
}

impl Weigh for Vec<u8> {
    fn bytes(&self) -> usize {
        self.len()
    }
    fn into_spare(self) -> Option<Vec<u8>> {
        Some(self)
    }
}

impl Weigh for crate::plan::Realized {
    fn bytes(&self) -> usize {
        crate::plan::Realized::bytes(self)
    }
}

/// The cache of merged blocks.
pub type BlockCache = Cache<Vec<u8>>;

/// Buffers of evicted blocks kept for the next blocks, at most this many bytes (and an eighth
/// of the budget, which covers them): a reader streaming through a model then allocates
/// (and page-faults) nothing in steady state.
const SPARE_BYTES: usize = 16 << 20;

type Pending<V> = Arc<OnceLock<Result<Arc<V>, Arc<Error>>>>;

struct Inner<V> {
    lru: LruCache<BlockKey, Arc<V>>,
    bytes: usize,
    pending: HashMap<BlockKey, Pending<V>>,
    spare: Vec<Vec<u8>>,
    spare_bytes: usize,
}

/// Counters, readable while the cache is in use.
#[derive(Default, Debug)]
pub struct CacheStats {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    /// Lookups that found the block being computed by another reader and waited for it.
    pub waits: AtomicU64,
    pub bytes_computed: AtomicU64,
    pub evictions: AtomicU64,
}

pub struct Cache<V> {
    budget: usize,
    inner: Mutex<Inner<V>>,
    pub stats: CacheStats,
}

impl<V: Weigh> Cache<V> {
    /// A cache holding at most `budget` bytes (0 disables caching, not sharing).
    pub fn new(budget: usize) -> Cache<V> {
        Cache {
            budget,
            inner: Mutex::new(Inner {
                lru: LruCache::unbounded(),
                bytes: 0,
                pending: HashMap::new(),
                spare: Vec::new(),
                spare_bytes: 0,
            }),
            stats: CacheStats::default(),
        }
    }

    pub fn budget(&self) -> usize {
        self.budget
    }

    /// Bytes currently held.
    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }

    /// Whether the block is cached or being computed right now.
    pub fn present_or_pending(&self, key: BlockKey) -> bool {
        let inner = self.lock();
        inner.lru.contains(&key) || inner.pending.contains_key(&key)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner<V>> {
        // A panic while holding the lock cannot leave `Inner` inconsistent in a way that
        // matters (at worst a stale byte count), so recover from poisoning.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A buffer of `len` bytes for a new block, recycled from an evicted one if possible. Its
    /// contents are unspecified: the caller overwrites all of it.
    pub fn buffer(&self, len: usize) -> Vec<u8> {
        let recycled = {
            let mut inner = self.lock();
            let found = inner.spare.iter().position(|b| b.capacity() >= len);
            found.map(|i| {
                let b = inner.spare.swap_remove(i);
                inner.spare_bytes -= b.capacity();
                b
            })
        };
        match recycled {
            Some(mut buffer) => {
                buffer.truncate(len);
                buffer.resize(len, 0);
                buffer
            }
            // Zeroed by the allocator: memory fresh from the kernel is zero already, where
            // a `resize` would write every byte of it once more before the merge does.
            None => vec![0; len],
        }
    }

    /// The entry for `key`, computing it with `compute` if no one has it or is making it.
    pub fn get_or_compute(
        &self,
        key: BlockKey,
        compute: impl FnOnce() -> Result<V>,
    ) -> Result<Arc<V>> {
        let pending = {
            let mut inner = self.lock();
            if let Some(block) = inner.lru.get(&key) {
                self.stats.hits.fetch_add(1, Ordering::Relaxed);
                return Ok(block.clone());
            }
            match inner.pending.get(&key) {
                Some(p) => {
                    self.stats.waits.fetch_add(1, Ordering::Relaxed);
                    p.clone()
                }
                None => {
                    let p: Pending<V> = Arc::default();
                    inner.pending.insert(key, p.clone());
                    p
                }
            }
        };
        let mut computed = false;
        let result = pending.get_or_init(|| {
            computed = true;
            self.stats.misses.fetch_add(1, Ordering::Relaxed);
            compute().map(Arc::new).map_err(Arc::new)
        });
        if computed {
            let mut inner = self.lock();
            inner.pending.remove(&key);
            if let Ok(entry) = result {
                let bytes = entry.bytes();
                self.stats
                    .bytes_computed
                    .fetch_add(bytes as u64, Ordering::Relaxed);
                if bytes <= self.budget {
                    inner.bytes += bytes;
                    if let Some(old) = inner.lru.put(key, entry.clone()) {
                        inner.bytes -= old.bytes();
                    }
                    // The budget covers cached blocks and the spare buffers together.
                    while inner.bytes + inner.spare_bytes > self.budget && inner.bytes > 0 {
                        let (_, evicted) = inner.lru.pop_lru().expect("bytes > 0 implies an entry");
                        inner.bytes -= evicted.bytes();
                        self.stats.evictions.fetch_add(1, Ordering::Relaxed);
                        // Recycle the buffer unless a reader still holds the entry.
                        let spare = Arc::try_unwrap(evicted).ok().and_then(V::into_spare);
                        if let Some(buffer) = spare {
                            let spare_max = SPARE_BYTES.min(self.budget / 8);
                            if inner.spare_bytes + buffer.capacity() <= spare_max {
                                inner.spare_bytes += buffer.capacity();
                                inner.spare.push(buffer);
                            }
                        }
                    }
                }
            }
        }
        result.clone().map_err(Error::Shared)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn stays_within_budget_and_evicts_least_recent() {
        let cache = BlockCache::new(10);
        for i in 0..5u32 {
            cache
                .get_or_compute((0, i), || Ok(vec![i as u8; 4]))
                .unwrap();
        }
        assert!(cache.bytes() <= 10);
        assert!(
            cache.present_or_pending((0, 4))
                && cache.present_or_pending((0, 3))
                && !cache.present_or_pending((0, 0))
        );
        let block = cache
            .get_or_compute((0, 4), || panic!("must be a hit"))
            .unwrap();
        assert_eq!(&block[..], &[4, 4, 4, 4]);
    }

    #[test]
    fn zero_budget_still_returns_blocks() {
        let cache = BlockCache::new(0);
        let block = cache.get_or_compute((1, 1), || Ok(vec![7; 3])).unwrap();
        assert_eq!(&block[..], &[7, 7, 7]);
        assert_eq!(cache.bytes(), 0);
    }

    #[test]
    fn concurrent_readers_share_one_computation() {
        let cache: Arc<BlockCache> = Arc::new(BlockCache::new(1 << 20));
        let calls = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (cache, calls) = (cache.clone(), calls.clone());
                std::thread::spawn(move || {
                    cache
                        .get_or_compute((0, 0), || {
                            calls.fetch_add(1, Ordering::SeqCst);
                            std::thread::sleep(std::time::Duration::from_millis(50));
                            Ok(vec![1; 16])
                        })
                        .unwrap()
                })
            })
            .collect();
        for t in threads {
            assert_eq!(t.join().unwrap().len(), 16);
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn errors_reach_every_waiter_and_are_not_cached() {
        let cache = BlockCache::new(100);
        let err = cache
            .get_or_compute((0, 0), || Err(Error::NoSuchFile(3)))
            .unwrap_err();
        assert!(err.to_string().contains("no file with id 3"));
        assert_eq!(
            &cache.get_or_compute((0, 0), || Ok(vec![2])).unwrap()[..],
            &[2]
        );
    }
}
