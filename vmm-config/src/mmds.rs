//! `/mmds`: the metadata store, with Firecracker's rules: any JSON value
//! is PUT, a PATCH is a JSON merge patch (RFC 7396) onto a store a PUT
//! initialized, and the store, as compact JSON, stays within its limit
//! (`--mmds-size-limit`, by default the API's payload limit).

use serde_json::Value;

/// Why the store refused a change (Firecracker's texts).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MmdsError {
    #[error("MMDS error: The MMDS data store is not initialized.")]
    NotInitialized,
    /// Answered 413.
    #[error("MMDS limit exceeded error: The MMDS patch request doesn't fit.")]
    TooLarge,
}

/// The store's limit without `--mmds-size-limit`: Firecracker's default
/// API payload limit.
pub const DEFAULT_MMDS_SIZE_LIMIT: usize = 51200;

/// The metadata store.
#[derive(Debug, Clone, PartialEq)]
pub struct MmdsStore {
    /// None until the first PUT.
    data: Option<Value>,
    /// The most bytes its compact JSON may take.
    limit: usize,
}

impl Default for MmdsStore {
    fn default() -> Self {
        Self::new(DEFAULT_MMDS_SIZE_LIMIT)
    }
}

impl MmdsStore {
    /// An empty store of at most `limit` bytes.
    pub fn new(limit: usize) -> Self {
        Self { data: None, limit }
    }

    /// Replaces the store with `value`.
    pub fn put(&mut self, value: Value) -> Result<(), MmdsError> {
        self.check_size(&value)?;
        self.data = Some(value);
        Ok(())
    }

    /// Merges `patch` into the store; the store is unchanged if the result
    /// would not fit.
    pub fn patch(&mut self, patch: &Value) -> Result<(), MmdsError> {
        let mut next = self.data.clone().ok_or(MmdsError::NotInitialized)?;
        merge_patch(&mut next, patch);
        self.check_size(&next)?;
        self.data = Some(next);
        Ok(())
    }

    /// The store (`{}` before the first PUT, or after a PUT of null).
    pub fn get(&self) -> Value {
        match &self.data {
            None | Some(Value::Null) => Value::Object(Default::default()),
            Some(value) => value.clone(),
        }
    }

    fn check_size(&self, value: &Value) -> Result<(), MmdsError> {
        let len = serde_json::to_vec(value).map_or(usize::MAX, |bytes| bytes.len());
        if len > self.limit {
            return Err(MmdsError::TooLarge);
        }
        Ok(())
    }
}

/// RFC 7396: an object patch merges key by key (null removes a key), any
/// other patch replaces the target.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Default::default());
    }
    let Value::Object(target) = target else {
        return;
    };
    for (key, value) in patch {
        if value.is_null() {
            target.remove(key);
        } else {
            merge_patch(target.entry(key.clone()).or_insert(Value::Null), value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_patch_merges_as_rfc_7396_says() {
        let mut store = MmdsStore::new(1 << 20);
        assert_eq!(store.get(), json!({}));
        assert_eq!(
            store.patch(&json!({"a": 1})),
            Err(MmdsError::NotInitialized)
        );
        store
            .put(json!({"a": "b", "c": {"d": "e", "f": "g"}, "list": [1]}))
            .unwrap();
        store
            .patch(&json!({"a": "z", "c": {"f": null}, "list": [2, 3], "new": {"x": 1}}))
            .unwrap();
        assert_eq!(
            store.get(),
            json!({"a": "z", "c": {"d": "e"}, "list": [2, 3], "new": {"x": 1}})
        );
        store.patch(&json!("scalar")).unwrap();
        assert_eq!(store.get(), json!("scalar"));
        store.patch(&json!({"back": true})).unwrap();
        assert_eq!(store.get(), json!({"back": true}));
    }

    #[test]
    fn the_store_stays_within_its_limit() {
        let mut store = MmdsStore::new(20);
        store.put(json!({"k": "0123456789"})).unwrap();
        assert_eq!(store.patch(&json!({"more": "x"})), Err(MmdsError::TooLarge));
        assert_eq!(
            store.get(),
            json!({"k": "0123456789"}),
            "a refused patch changed it"
        );
        assert_eq!(
            store.put(json!("a string longer than twenty")),
            Err(MmdsError::TooLarge)
        );
    }
}
