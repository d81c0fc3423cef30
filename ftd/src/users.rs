//! The web console's users (`/api/users`): a name and a password, kept as
//! an argon2id hash (RustCrypto's `argon2`, its default parameters: 19 MiB,
//! 2 passes), replicated to the peer over the pair channel. A user logs in
//! to the console with the password instead of the API token; the audit
//! log then names them.

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;

use crate::manager::{Manager, ManagerError};
use crate::model::{FieldError, Severity, UserView};
use crate::store::UserRecord;

/// The name the API token logs in as: no user may take it (the audit log
/// would not tell them apart).
pub const TOKEN_USER: &str = "admin";

/// Shortest password taken.
pub const MIN_PASSWORD: usize = 10;
/// Longest password taken (the hash's input stays small).
pub const MAX_PASSWORD: usize = 1024;

/// A user's name: 1-32 characters of lower-case letters, digits, '.', '_'
/// and '-', a letter first.
pub fn check_user_name(name: &str) -> Result<(), FieldError> {
    let ok = (1..=32).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
    if name == TOKEN_USER {
        return Err(FieldError {
            field: "name".into(),
            reason: format!("{TOKEN_USER:?} is the API token's name in the console"),
        });
    }
    if ok {
        Ok(())
    } else {
        Err(FieldError {
            field: "name".into(),
            reason: format!(
                "user name {name:?}: 1-32 lower-case letters, digits, '.', '_' or '-', a letter first"
            ),
        })
    }
}

fn check_password(password: &str) -> Result<(), FieldError> {
    let n = password.chars().count();
    if (MIN_PASSWORD..=MAX_PASSWORD).contains(&n) {
        Ok(())
    } else {
        Err(FieldError {
            field: "password".into(),
            reason: format!("{n} characters; a password has {MIN_PASSWORD} to {MAX_PASSWORD}"),
        })
    }
}

/// The argon2id hash of `password` with a fresh salt (a PHC string).
pub fn hash_password(password: &str) -> Result<String, ManagerError> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(|e| ManagerError::Password(e.to_string()))?;
    let salt = SaltString::encode_b64(&bytes).map_err(|e| ManagerError::Password(e.to_string()))?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| ManagerError::Password(e.to_string()))
}

/// Whether `password` matches the PHC string `hash`.
pub fn password_matches(password: &str, hash: &str) -> bool {
    PasswordHash::new(hash).is_ok_and(|parsed| {
        Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok()
    })
}

impl Manager {
    /// The live users, by name.
    pub fn users(&self) -> Result<Vec<UserView>, ManagerError> {
        Ok(self
            .store()
            .user_records()?
            .into_iter()
            .filter(|u| u.password_hash.is_some())
            .map(|u| UserView {
                name: u.name,
                updated_unix_ms: u.updated_unix_ms,
            })
            .collect())
    }

    /// Makes user `name`, or changes their password (hashing takes tens
    /// of ms: call it off the async workers).
    pub fn set_user_password(&self, name: &str, password: &str) -> Result<UserView, ManagerError> {
        check_user_name(name).map_err(ManagerError::Invalid)?;
        check_password(password).map_err(ManagerError::Invalid)?;
        let existed = self.store().user(name)?.is_some();
        let hash = hash_password(password)?;
        let user = self
            .store()
            .set_user(name, Some(hash))?
            .ok_or_else(|| ManagerError::Password("the user was not written".into()))?;
        self.record(
            Severity::Info,
            false,
            "user",
            None,
            &format!(
                "console user {name} {}",
                if existed {
                    "has a new password"
                } else {
                    "made"
                }
            ),
        );
        self.touch();
        Ok(UserView {
            name: user.name,
            updated_unix_ms: user.updated_unix_ms,
        })
    }

    pub fn delete_user(&self, name: &str) -> Result<(), ManagerError> {
        match self.store().set_user(name, None)? {
            Some(_) => {
                self.record(
                    Severity::Info,
                    false,
                    "user",
                    None,
                    &format!("console user {name} deleted"),
                );
                self.touch();
                Ok(())
            }
            None => Err(ManagerError::NoSuchUser(name.to_string())),
        }
    }

    /// The revision of user `name` if `password` is theirs (none: no
    /// such user, or another password). An unknown name costs a hash too,
    /// so that the time does not tell names apart.
    pub fn user_login(&self, name: &str, password: &str) -> Result<Option<u64>, ManagerError> {
        match self.store().user(name)? {
            Some(UserRecord {
                password_hash: Some(hash),
                revision,
                ..
            }) => Ok(password_matches(password, &hash).then_some(revision)),
            _ => {
                let _ = hash_password(password);
                Ok(None)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hash_matches_its_password_only() {
        let hash = hash_password("correct horse battery").unwrap();
        assert!(hash.starts_with("$argon2id$"), "{hash}");
        assert!(password_matches("correct horse battery", &hash));
        assert!(!password_matches("correct horse battery!", &hash));
        assert!(!password_matches(
            "correct horse battery",
            "not a phc string"
        ));
        // A fresh salt each time.
        assert_ne!(hash, hash_password("correct horse battery").unwrap());
    }

    #[test]
    fn names_and_passwords_are_checked() {
        assert!(check_user_name("alice").is_ok());
        assert!(check_user_name("ops.team-2").is_ok());
        for bad in [
            "",
            "Alice",
            "1alice",
            "al ice",
            "admin",
            "a".repeat(33).as_str(),
        ] {
            assert_eq!(check_user_name(bad).unwrap_err().field, "name", "{bad:?}");
        }
        assert!(check_password("0123456789").is_ok());
        assert_eq!(check_password("short").unwrap_err().field, "password");
    }
}
