//! The backend's copy of the MMDS store: assembled from the VMM's pieces,
//! swapped in whole, and read as Firecracker answers a guest's GET.

use serde_json::Value;
use tessera_backend_control::MmdsPiece;

/// The largest store a backend assembles.
pub const MAX_STORE: u32 = 64 << 20;

/// Why a piece of the store was refused (the store in force stays).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("a store of {0} bytes (at most {MAX_STORE})")]
    TooLarge(u32),
    #[error("piece at {offset} of generation {generation}; expected {expected}")]
    OutOfOrder {
        generation: u32,
        offset: u32,
        expected: String,
    },
    #[error("the store is not JSON: {0}")]
    Json(String),
}

/// Why a GET found nothing to answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GetError {
    NotFound,
    UnsupportedType,
}

/// How a GET wants its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Imds,
}

#[derive(Debug)]
struct Assembly {
    generation: u32,
    total: u32,
    bytes: Vec<u8>,
}

/// The store the guest reads.
#[derive(Debug, Default)]
pub struct Store {
    value: Value,
    assembling: Option<Assembly>,
}

impl Store {
    /// Takes one piece; `Ok(true)` when it completed a store, now in force.
    pub fn piece(&mut self, piece: MmdsPiece) -> Result<bool, StoreError> {
        if piece.offset == 0 {
            if piece.total > MAX_STORE {
                self.assembling = None;
                return Err(StoreError::TooLarge(piece.total));
            }
            self.assembling = Some(Assembly {
                generation: piece.generation,
                total: piece.total,
                bytes: Vec::with_capacity(piece.total.min(1 << 20) as usize),
            });
        }
        let fits = self.assembling.as_ref().is_some_and(|a| {
            a.generation == piece.generation
                && a.total == piece.total
                && a.bytes.len() == piece.offset as usize
        });
        let Some(assembly) = self.assembling.as_mut().filter(|_| fits) else {
            let expected = match self.assembling.take() {
                Some(a) => format!("generation {} at {}", a.generation, a.bytes.len()),
                None => "a first piece".to_string(),
            };
            return Err(StoreError::OutOfOrder {
                generation: piece.generation,
                offset: piece.offset,
                expected,
            });
        };
        assembly.bytes.extend(&piece.data);
        if assembly.bytes.len() < assembly.total as usize {
            return Ok(false);
        }
        let bytes = std::mem::take(&mut assembly.bytes);
        self.assembling = None;
        self.value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).map_err(|e| StoreError::Json(e.to_string()))?
        };
        Ok(true)
    }

    /// The value at `path` (a URI path: `//` collapsed, one trailing `/`
    /// dropped, then a JSON pointer), in `format`.
    pub fn get(&self, path: &str, format: Format) -> Result<String, GetError> {
        let mut pointer = collapse_slashes(path);
        if pointer.ends_with('/') {
            pointer.pop();
        }
        let value = self.value.pointer(&pointer).ok_or(GetError::NotFound)?;
        match format {
            Format::Json => Ok(value.to_string()),
            Format::Imds => imds(value),
        }
    }
}

/// `//` and longer runs of slashes become one (Firecracker's URI rule).
pub fn collapse_slashes(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for c in path.chars() {
        if !(c == '/' && out.ends_with('/')) {
            out.push(c);
        }
    }
    out
}

/// EC2's format: an object lists its keys, one per line, those of objects
/// with a `/`; a string is itself; nothing else has a form.
fn imds(value: &Value) -> Result<String, GetError> {
    match value {
        Value::Object(map) => Ok(map
            .iter()
            .map(|(key, value)| {
                if value.is_object() {
                    format!("{key}/")
                } else {
                    key.clone()
                }
            })
            .collect::<Vec<_>>()
            .join("\n")),
        Value::String(s) => Ok(s.clone()),
        _ => Err(GetError::UnsupportedType),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_backend_control::{mmds_store, ControlMessage};

    fn store_of(json: &str) -> Store {
        let mut store = Store::default();
        for message in mmds_store(1, json.as_bytes()) {
            let ControlMessage::MmdsData(piece) = message else {
                panic!("not a piece");
            };
            store.piece(piece).unwrap();
        }
        store
    }

    #[test]
    fn gets_answer_as_firecracker_formats_them() {
        let store = store_of(r#"{"latest":{"meta-data":{"ami-id":"ami-1","b":{"c":"d"},"n":1}}}"#);
        assert_eq!(
            store.get("/latest/meta-data/", Format::Imds).as_deref(),
            Ok("ami-id\nb/\nn")
        );
        assert_eq!(
            store
                .get("//latest//meta-data/ami-id", Format::Imds)
                .as_deref(),
            Ok("ami-1")
        );
        assert_eq!(
            store.get("/latest/meta-data/b", Format::Json).as_deref(),
            Ok(r#"{"c":"d"}"#)
        );
        assert_eq!(
            store.get("/latest/meta-data/n", Format::Imds),
            Err(GetError::UnsupportedType)
        );
        assert_eq!(store.get("/nope", Format::Json), Err(GetError::NotFound));
        assert_eq!(
            Store::default().get("/", Format::Json).as_deref(),
            Ok("null")
        );
    }

    #[test]
    fn a_store_is_swapped_in_only_when_whole_and_in_order() {
        let big = format!(r#"{{"k":"{}"}}"#, "x".repeat(1000));
        let pieces: Vec<MmdsPiece> = mmds_store(2, big.as_bytes())
            .into_iter()
            .map(|m| match m {
                ControlMessage::MmdsData(p) => p,
                other => panic!("{other:?}"),
            })
            .collect();
        let mut store = store_of(r#"{"k":"old"}"#);
        assert_eq!(store.piece(pieces[0].clone()), Ok(false));
        assert_eq!(store.get("/k", Format::Imds).as_deref(), Ok("old"));
        assert!(matches!(
            store.piece(pieces[2].clone()),
            Err(StoreError::OutOfOrder { .. })
        ));
        // The assembly was dropped: the rest is refused until a new start.
        assert!(store.piece(pieces[1].clone()).is_err());
        for piece in &pieces {
            store.piece(piece.clone()).unwrap();
        }
        assert_eq!(store.get("/k", Format::Imds).map(|s| s.len()), Ok(1000));
        let mut huge = pieces[0].clone();
        huge.total = MAX_STORE + 1;
        assert_eq!(store.piece(huge), Err(StoreError::TooLarge(MAX_STORE + 1)));
        let bad = MmdsPiece {
            generation: 3,
            total: 2,
            offset: 0,
            data: b"{x".to_vec(),
        };
        assert!(matches!(store.piece(bad), Err(StoreError::Json(_))));
        assert_eq!(store.get("/k", Format::Imds).map(|s| s.len()), Ok(1000));
    }
}
