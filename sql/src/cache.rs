//! A bounded, thread-safe map from a text (exact SQL, or a shape) to what it classified as.
//!
//! Two generations per shard: new entries go to the young map; when it is full it becomes the
//! old map and the previous old map is dropped; a hit in the old map moves the entry back to
//! the young one. That approximates LRU with O(1) work, no linked list and no `unsafe`, and
//! bounds both the number of entries and the bytes they hold.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex};

const SHARDS: usize = 16;

pub(crate) struct Cache<V: ?Sized> {
    /// Keyed SipHash: a client cannot choose SQL texts that collide.
    hasher: std::collections::hash_map::RandomState,
    shards: Vec<Mutex<Shard<V>>>,
    /// Per shard, per generation.
    max_entries: usize,
    max_bytes: usize,
}

struct Shard<V: ?Sized> {
    young: HashMap<u64, Entry<V>>,
    young_bytes: usize,
    old: HashMap<u64, Entry<V>>,
}

struct Entry<V: ?Sized> {
    key: Box<str>,
    value: Arc<V>,
    bytes: usize,
}

impl<V: ?Sized> Cache<V> {
    /// At most `capacity` entries and about `max_bytes` of SQL and results in all.
    pub(crate) fn new(capacity: usize, max_bytes: usize) -> Cache<V> {
        let shards = if capacity >= 16 * SHARDS { SHARDS } else { 1 };
        Cache {
            hasher: std::collections::hash_map::RandomState::new(),
            shards: (0..shards)
                .map(|_| {
                    Mutex::new(Shard {
                        young: HashMap::new(),
                        young_bytes: 0,
                        old: HashMap::new(),
                    })
                })
                .collect(),
            max_entries: (capacity / shards / 2).max(1),
            max_bytes: max_bytes / shards / 2,
        }
    }

    fn shard(&self, hash: u64) -> Option<&Mutex<Shard<V>>> {
        let index = usize::try_from(hash % self.shards.len() as u64).unwrap_or(0);
        self.shards.get(index)
    }

    pub(crate) fn get(&self, key: &str) -> Option<Arc<V>> {
        let hash = self.hasher.hash_one(key);
        // A poisoned shard is only a miss: the caller classifies from scratch.
        let mut shard = self.shard(hash)?.lock().ok()?;
        if let Some(entry) = shard.young.get(&hash) {
            return (*entry.key == *key).then(|| entry.value.clone());
        }
        let entry = shard.old.remove(&hash)?;
        if *entry.key != *key {
            return None;
        }
        let value = entry.value.clone();
        shard.insert(hash, entry, self.max_entries, self.max_bytes);
        Some(value)
    }

    /// `value_bytes`: about how much memory the value holds; the key is counted here.
    pub(crate) fn insert(&self, key: &str, value: Arc<V>, value_bytes: usize) {
        let bytes = key.len().saturating_add(value_bytes);
        if bytes > self.max_bytes {
            return;
        }
        let hash = self.hasher.hash_one(key);
        let Some(Ok(mut shard)) = self.shard(hash).map(Mutex::lock) else {
            return;
        };
        let entry = Entry {
            key: key.into(),
            value,
            bytes,
        };
        shard.insert(hash, entry, self.max_entries, self.max_bytes);
    }

    pub(crate) fn len(&self) -> usize {
        self.shards
            .iter()
            .filter_map(|shard| shard.lock().ok())
            .map(|shard| shard.young.len() + shard.old.len())
            .sum()
    }
}

impl<V: ?Sized> Shard<V> {
    fn insert(&mut self, hash: u64, entry: Entry<V>, max_entries: usize, max_bytes: usize) {
        if let Some(previous) = self.young.remove(&hash) {
            self.young_bytes = self.young_bytes.saturating_sub(previous.bytes);
        }
        if self.young.len() >= max_entries || self.young_bytes + entry.bytes > max_bytes {
            self.old = std::mem::take(&mut self.young);
            self.young_bytes = 0;
        }
        self.old.remove(&hash);
        self.young_bytes += entry.bytes;
        self.young.insert(hash, entry);
    }
}
