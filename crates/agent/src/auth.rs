//! The API's credentials: bearer tokens, each with a role.
//!
//! A tokens file holds one token per line as `ROLE TOKEN`, `ROLE` being `read` (`GET`
//! requests: status and progress) or `operator` (everything); blank lines and lines starting
//! with `#` are ignored. A token is at least [`MIN_TOKEN_CHARS`] characters of the RFC 6750
//! token68 alphabet (letters, digits, `-._~+/`, then `=` padding): 32 random bytes in
//! base64 (`hitless token new`, or `openssl rand -base64 32`). The file must be readable by
//! its owner only (mode `0600` or stricter): a file the group or others may read or write is
//! refused. The same file format names the `hitless` command's credential.
//!
//! The agent keeps only the SHA-256 digests of the tokens and compares a presented token's
//! digest with every one of them in constant time. No token is ever logged or named in an
//! error.

use std::fmt;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use rand::RngCore as _;
use sha2::{Digest, Sha256};
use subtle::{ConditionallySelectable, ConstantTimeEq};
use thiserror::Error;

/// The largest tokens file accepted.
pub const MAX_TOKENS_FILE_BYTES: u64 = 64 * 1024;
/// The most tokens one file may hold.
pub const MAX_TOKENS: usize = 256;
/// The shortest token accepted: 32 bytes in unpadded base64.
pub const MIN_TOKEN_CHARS: usize = 43;
/// The longest token accepted.
pub const MAX_TOKEN_CHARS: usize = 512;

/// What a token may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// `GET` requests: status and progress.
    Read,
    /// Every request: upgrade, abort, rollback, commit, resume, and what `read` may do.
    Operator,
}

impl Role {
    /// The role's name in a tokens file.
    pub fn name(self) -> &'static str {
        match self {
            Role::Read => "read",
            Role::Operator => "operator",
        }
    }

    fn parse(word: &str) -> Option<Role> {
        match word {
            "read" => Some(Role::Read),
            "operator" => Some(Role::Operator),
            _ => None,
        }
    }

    /// Whether this role may do what `needed` allows.
    pub fn allows(self, needed: Role) -> bool {
        self >= needed
    }

    fn code(self) -> u8 {
        match self {
            Role::Read => 1,
            Role::Operator => 2,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::parse(s).ok_or_else(|| format!("{s:?} is not a role; use read or operator"))
    }
}

/// A tokens file that cannot be used. The messages never quote the file's content.
#[derive(Debug, Error)]
pub enum TokensError {
    #[error("cannot read the tokens file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the tokens file {path} is not a regular file")]
    NotAFile { path: PathBuf },
    #[error("the tokens file {path} has mode {mode:04o}: its group or others may read or write it; make it readable by its owner only (chmod 600)")]
    Permissions { path: PathBuf, mode: u32 },
    #[error("the tokens file {path} is over the limit of {MAX_TOKENS_FILE_BYTES} bytes")]
    TooLarge { path: PathBuf },
    #[error("the tokens file {path} is not valid: line {line}: {message}")]
    Malformed {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("the tokens file {path} holds no token")]
    Empty { path: PathBuf },
    #[error("the tokens file {path} holds over {MAX_TOKENS} tokens")]
    TooMany { path: PathBuf },
}

/// One token of a tokens file, in clear (what the `hitless` command sends).
#[derive(Clone, PartialEq, Eq)]
pub struct Credential {
    pub role: Role,
    /// The token itself.
    pub token: String,
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the token.
        write!(f, "Credential({}, <redacted>)", self.role)
    }
}

impl Credential {
    /// The credential of a tokens file to present: its first operator token, else its first
    /// token.
    pub fn load(path: &Path) -> Result<Credential, TokensError> {
        let all = read_file(path)?;
        let best = all
            .iter()
            .find(|c| c.role == Role::Operator)
            .or_else(|| all.first())
            .cloned();
        best.ok_or_else(|| TokensError::Empty {
            path: path.to_owned(),
        })
    }
}

/// The tokens an agent accepts (their digests and roles).
#[derive(Clone)]
pub struct Tokens {
    entries: Vec<([u8; 32], Role)>,
}

impl fmt::Debug for Tokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Tokens({} tokens)", self.entries.len())
    }
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

impl Tokens {
    /// Reads a tokens file, refusing one its group or others may read or write, a missing or
    /// empty one and a malformed one.
    pub fn load(path: &Path) -> Result<Tokens, TokensError> {
        let entries = read_file(path)?;
        if entries.is_empty() {
            return Err(TokensError::Empty {
                path: path.to_owned(),
            });
        }
        Ok(Tokens::from_credentials(&entries))
    }

    /// The tokens `credentials` name.
    pub fn from_credentials(credentials: &[Credential]) -> Tokens {
        Tokens {
            entries: credentials
                .iter()
                .map(|c| (digest(&c.token), c.role))
                .collect(),
        }
    }

    /// How many tokens there are.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The role of `presented`, if it is one of the tokens. Every token's digest is compared,
    /// each in constant time: the time taken does not depend on which token matched, or on
    /// how much of one did.
    pub fn role_of(&self, presented: &str) -> Option<Role> {
        let d = digest(presented);
        let mut code = 0u8;
        for (known, role) in &self.entries {
            code = u8::conditional_select(&code, &role.code(), known.ct_eq(&d));
        }
        match code {
            1 => Some(Role::Read),
            2 => Some(Role::Operator),
            _ => None,
        }
    }
}

/// Whether `token` is made of the token68 alphabet (RFC 6750): letters, digits, `-._~+/`,
/// then `=` padding only.
fn is_token68(token: &str) -> bool {
    let body = token.trim_end_matches('=');
    !body.is_empty()
        && body
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~+/".contains(&b))
}

/// Checks a token's shape (never its content in an error).
fn check_token(token: &str) -> Result<(), String> {
    if !is_token68(token) {
        return Err(
            "the token has characters outside letters, digits and -._~+/= (it may not hold spaces)"
                .into(),
        );
    }
    if token.len() < MIN_TOKEN_CHARS {
        return Err(format!(
            "the token is {} characters; a token needs at least {MIN_TOKEN_CHARS} (32 random bytes in base64: `hitless token new`)",
            token.len()
        ));
    }
    if token.len() > MAX_TOKEN_CHARS {
        return Err(format!(
            "the token is {} characters, over the limit of {MAX_TOKEN_CHARS}",
            token.len()
        ));
    }
    Ok(())
}

fn read_file(path: &Path) -> Result<Vec<Credential>, TokensError> {
    let read = |source| TokensError::Read {
        path: path.to_owned(),
        source,
    };
    // The mode is checked on the file opened, not on the name (which may change meanwhile).
    let file = std::fs::File::open(path).map_err(read)?;
    let meta = file.metadata().map_err(read)?;
    if !meta.is_file() {
        return Err(TokensError::NotAFile {
            path: path.to_owned(),
        });
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(TokensError::Permissions {
            path: path.to_owned(),
            mode,
        });
    }
    let mut text = String::new();
    file.take(MAX_TOKENS_FILE_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(read)?;
    if text.len() as u64 > MAX_TOKENS_FILE_BYTES {
        return Err(TokensError::TooLarge {
            path: path.to_owned(),
        });
    }
    parse(path, &text)
}

/// Parses the text of a tokens file; `path` names it in errors.
pub fn parse(path: &Path, text: &str) -> Result<Vec<Credential>, TokensError> {
    let mut out: Vec<Credential> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let malformed = |message: String| TokensError::Malformed {
            path: path.to_owned(),
            line: i + 1,
            message,
        };
        let words: Vec<&str> = line.split_whitespace().collect();
        let [role, token] = words[..] else {
            return Err(malformed(format!(
                "{} words; a line is `ROLE TOKEN`",
                words.len()
            )));
        };
        let role = Role::parse(role)
            .ok_or_else(|| malformed("the role is not `read` or `operator`".into()))?;
        check_token(token).map_err(malformed)?;
        if out.iter().any(|c| c.token == token) {
            return Err(malformed("the token is also on an earlier line".into()));
        }
        if out.len() == MAX_TOKENS {
            return Err(TokensError::TooMany {
                path: path.to_owned(),
            });
        }
        out.push(Credential {
            role,
            token: token.to_owned(),
        });
    }
    Ok(out)
}

/// A fresh token: 32 bytes from the operating system's random source, in unpadded base64url
/// (43 characters).
pub fn generate() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Writes a tokens file readable by its owner only (created with mode 0600, and set to it if
/// it existed).
pub fn write_file(path: &Path, credentials: &[Credential]) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut text = String::from("# ROLE TOKEN (read: status and progress; operator: everything)\n");
    for c in credentials {
        text.push_str(&format!("{} {}\n", c.role, c.token));
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    f.write_all(text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cred(role: Role) -> Credential {
        Credential {
            role,
            token: generate(),
        }
    }

    #[test]
    fn a_generated_token_is_43_base64url_characters_and_accepted() {
        let t = generate();
        assert_eq!(t.len(), 43);
        assert!(check_token(&t).is_ok());
        assert_ne!(t, generate(), "two tokens drawn alike");
    }

    #[test]
    fn a_token_is_recognised_with_its_role_and_nothing_else_is() {
        let (r, o) = (cred(Role::Read), cred(Role::Operator));
        let tokens = Tokens::from_credentials(&[r.clone(), o.clone()]);
        assert_eq!(tokens.role_of(&r.token), Some(Role::Read));
        assert_eq!(tokens.role_of(&o.token), Some(Role::Operator));
        // Same length, one character changed.
        let mut wrong = o.token.clone().into_bytes();
        wrong[10] = if wrong[10] == b'A' { b'B' } else { b'A' };
        assert_eq!(tokens.role_of(&String::from_utf8(wrong).unwrap()), None);
        assert_eq!(tokens.role_of(""), None);
        assert!(Role::Operator.allows(Role::Read));
        assert!(!Role::Read.allows(Role::Operator));
    }

    #[test]
    fn a_file_the_group_or_others_may_read_is_refused_naming_it() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("api-tokens");
        write_file(&path, &[cred(Role::Operator)]).unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(Tokens::load(&path).unwrap().len(), 1);
        for mode in [0o644, 0o640, 0o602] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let e = Tokens::load(&path).unwrap_err().to_string();
            assert!(e.contains(&path.display().to_string()), "{e}");
            assert!(e.contains(&format!("{mode:04o}")), "{e}");
            assert!(e.contains("chmod 600"), "{e}");
            let e = Credential::load(&path).unwrap_err();
            assert!(matches!(e, TokensError::Permissions { .. }), "{e}");
        }
        let e = Tokens::load(&tmp.path().join("missing"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing") && e.contains("cannot read"), "{e}");
    }

    #[test]
    fn malformed_lines_are_refused_by_number_without_quoting_the_token() {
        let good = generate();
        let p = Path::new("tokens");
        let cases = [
            (format!("read {good} extra"), "line 1"),
            (format!("# comment\n\nwriter {good}"), "line 3"),
            ("operator tooshort".to_owned(), "at least 43"),
            (format!("operator {}", "é".repeat(30)), "outside letters"),
            (format!("read {good}\noperator {good}"), "earlier line"),
        ];
        for (text, needle) in cases {
            let e = parse(p, &text).unwrap_err().to_string();
            assert!(e.contains(needle), "{text:?}: {e}");
            assert!(!e.contains(&good) && !e.contains("tooshort"), "{e}");
        }
        let e = parse(p, "# nothing\n").unwrap();
        assert!(e.is_empty());
        let ok = parse(p, &format!("  read   {good}  \n")).unwrap();
        assert_eq!(ok[0].role, Role::Read);
        assert_eq!(ok[0].token, good);
    }

    #[test]
    fn the_credential_presented_is_the_first_operator_token_else_the_first() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("t");
        let (r, o) = (cred(Role::Read), cred(Role::Operator));
        write_file(&path, &[r.clone(), o.clone()]).unwrap();
        assert_eq!(Credential::load(&path).unwrap(), o);
        write_file(&path, std::slice::from_ref(&r)).unwrap();
        assert_eq!(Credential::load(&path).unwrap(), r);
        assert!(!format!("{r:?}").contains(&r.token));
        write_file(&path, &[]).unwrap();
        assert!(matches!(
            Tokens::load(&path).unwrap_err(),
            TokensError::Empty { .. }
        ));
    }
}
