//! Names that become file names or path components, checked by one rule in one place.
//!
//! Volume names (replica and data directories, `VOL.sock`, `VOL.nbd`, backupstore
//! paths), snapshot names (`volume-snap-NAME.img`), backup names (`backup_NAME.cfg`)
//! and recurring job names (labels and the snapshots they name) all pass [`check`]
//! before they reach a path, whoever sent them: the CLI, the control socket, a peer on
//! the replica protocol, or a backupstore.
//!
//! The rule: 1 to [`MAX_NAME`] ASCII letters, digits, `.`, `_` and `-`, not starting with
//! `.` or `-`. So a name never holds `/` or NUL, is never `.` or `..` (nor starts a
//! hidden file), is never read as a command-line option, and keeps every file name
//! built from it under NAME_MAX.

pub const MAX_NAME: usize = 200;

/// Checks `name`, a `kind` ("volume", "snapshot", "backup", "job") name.
pub fn check(kind: &str, name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err(format!("{kind} name is empty"));
    }
    if name.len() > MAX_NAME {
        return Err(format!("{kind} name is {} characters long (at most {MAX_NAME})", name.len()));
    }
    if let Some(c) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))) {
        return Err(format!("{kind} name {name:?} contains {c:?}; use letters, digits, '.', '_' and '-'"));
    }
    if name.starts_with('.') || name.starts_with('-') {
        return Err(format!("{kind} name {name:?} starts with {:?}", &name[..1]));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_names_are_refused() {
        for bad in ["", ".", "..", "../x", "a/b", "/abs", "a\0b", ".hidden", "-rf", "é", "a b", "x\n", &"a".repeat(MAX_NAME + 1)] {
            assert!(check("volume", bad).is_err(), "{bad:?} accepted");
        }
        for good in ["vol1", "pvc-ec17a7e4-1", "a.b_c-d", "A", &"a".repeat(MAX_NAME)] {
            assert!(check("volume", good).is_ok(), "{good:?} refused");
        }
        assert!(check("snapshot", "a/b").expect_err("refused").starts_with("snapshot name"));
    }
}
