//! The instance id rule of Firecracker's jailer: 1 to 64 characters of
//! `[A-Za-z0-9-]`, since the id becomes a directory and a cgroup name.

/// Errors in an instance id.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdError {
    #[error("invalid instance id {0:?}: it must be 1 to 64 characters long")]
    Length(String),
    #[error("invalid instance id {0:?}: only letters, digits and '-' are allowed")]
    Character(String),
}

/// Checks an instance id.
pub fn validate(id: &str) -> Result<(), IdError> {
    if id.is_empty() || id.len() > 64 {
        return Err(IdError::Length(id.to_string()));
    }
    if !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        return Err(IdError::Character(id.to_string()));
    }
    Ok(())
}

/// Checks a drive or interface id: the API's rule, the instance id rule
/// plus `_` (Firecracker allows it in resource ids).
pub fn validate_device_id(id: &str) -> Result<(), IdError> {
    if id.is_empty() || id.len() > 64 {
        return Err(IdError::Length(id.to_string()));
    }
    if id.parse::<tessera_types::DeviceId>().is_err() {
        return Err(IdError::Character(id.to_string()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        assert!(validate("551e7604-e35c-42b3-b825-416853441234").is_ok());
        assert!(matches!(validate(""), Err(IdError::Length(_))));
        assert!(matches!(validate(&"a".repeat(65)), Err(IdError::Length(_))));
        assert!(matches!(validate("a/b"), Err(IdError::Character(_))));
        assert!(matches!(validate("a_b"), Err(IdError::Character(_))));
        assert!(validate_device_id("drive_1").is_ok());
        assert!(matches!(
            validate_device_id("a/b"),
            Err(IdError::Character(_))
        ));
        assert!(matches!(validate_device_id(""), Err(IdError::Length(_))));
    }
}
