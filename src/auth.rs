//! The users table for username/password authentication (SOCKS5 RFC 1929, HTTP Basic RFC 7617).
//!
//! Secrets are plain text or crypt(3) hashes: SHA-512-crypt (`$6$`, Ulrich Drepper's "Unix crypt using SHA-256
//! and SHA-512") or bcrypt (`$2a$`, `$2b$`, `$2y$`). Hashes are checked for well-formedness when the table is
//! loaded, so a typo is a startup error naming the line rather than a user who can never log in.
//!
//! Nothing here prints or formats a secret: not `Debug`, not an error message.

use sha_crypt::{Params, PasswordVerifier, ShaCrypt};
use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::sync::Arc;

/// RFC 1929 carries the name length in one byte, so a longer name could never log in over SOCKS5.
const MAX_NAME_LEN: usize = 255;

/// Compared against when the user is unknown (and no hashed entries exist), so that an unknown name costs the same
/// constant-time comparison as a known one.
const DUMMY_SECRET: &[u8] = b"socksgate-dummy-secret-for-unknown-users";

/// One user's secret. `Debug` names the kind only.
#[derive(Clone, PartialEq, Eq)]
enum Secret {
    /// A plain-text password, compared in constant time.
    Plain(Box<[u8]>),
    /// A `$6$` SHA-512-crypt string, validated at load time.
    Sha512Crypt(Box<str>),
    /// A `$2a$`/`$2b$`/`$2y$` bcrypt string, validated at load time.
    Bcrypt(Box<str>),
}

impl Secret {
    /// Classifies and validates a secret from the users file; the error never quotes the secret.
    fn parse(pass: &str) -> Result<Secret, String> {
        if pass.is_empty() {
            return Err("empty password".into());
        }
        if pass.starts_with("$6$") {
            check_sha512_crypt(pass)?;
            return Ok(Secret::Sha512Crypt(pass.into()));
        }
        if ["$2a$", "$2b$", "$2y$"].iter().any(|p| pass.starts_with(p)) {
            check_bcrypt(pass)?;
            return Ok(Secret::Bcrypt(pass.into()));
        }
        // A string shaped like another crypt scheme ($1$ MD5, $5$ SHA-256, $y$ yescrypt, $2x$, $argon2id$, ...)
        // is almost certainly a hash we cannot verify; taking it as a plain password would make the hash text
        // itself the password. Refuse it instead.
        if let Some(id) = mcf_id(pass) {
            return Err(format!(
                // The id only, without its '$' delimiters: a message with no '$' can never contain a secret
                // that starts with one (the fuzzer found `$1$"` next to the quoted tag).
                "unsupported password hash scheme, crypt(5) id {id} (supported: id 6 SHA-512-crypt, ids 2a, 2b, 2y bcrypt)"
            ));
        }
        Ok(Secret::Plain(pass.as_bytes().into()))
    }

    /// True when verification is a deliberately slow key derivation.
    fn is_hash(&self) -> bool {
        !matches!(self, Secret::Plain(_))
    }

    /// Checks `pass` against this secret.
    fn matches(&self, pass: &[u8]) -> bool {
        match self {
            Secret::Plain(p) => ct_eq(pass, p),
            // The crate compares digests in constant time (ctutils).
            Secret::Sha512Crypt(h) => ShaCrypt::SHA512.verify_password(pass, &**h).is_ok(),
            // bcrypt uses only the first 72 password bytes, as every bcrypt implementation does; the crate
            // compares digests in constant time (subtle).
            Secret::Bcrypt(h) => bcrypt::verify(pass, h).unwrap_or(false),
        }
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Secret::Plain(_) => "<plain>",
            Secret::Sha512Crypt(_) => "<sha512-crypt>",
            Secret::Bcrypt(_) => "<bcrypt>",
        })
    }
}

/// The scheme id of a Modular Crypt Format string (`$id$...`, id of `[a-z0-9-]`), if `s` has that shape.
fn mcf_id(s: &str) -> Option<&str> {
    let (id, _) = s.strip_prefix('$')?.split_once('$')?;
    let ok = !id.is_empty()
        && id.len() <= 32
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    ok.then_some(id)
}

/// Validates `$6$[rounds=N$]salt$hash` the way `sha-crypt`'s verifier will read it (mcf fields, rounds within
/// 1000..=999999999, an 86-character digest decoding to 64 bytes), without running the key derivation.
fn check_sha512_crypt(s: &str) -> Result<(), String> {
    // No '$' in the message: a malformed "hash" may really be a password, and a message that spelled out the
    // format could then contain it (the fuzzer found "$6$[").
    const BAD: &str =
        "malformed SHA-512-crypt hash (crypt(5) id 6: optional rounds=N, salt, 86-character hash)";
    let hash = mcf::PasswordHashRef::new(s).map_err(|_| BAD.to_string())?;
    if hash.id() != "6" {
        return Err(BAD.into());
    }
    let mut fields = hash.fields();
    let first = fields.next().ok_or(BAD)?;
    if first.as_str().starts_with("rounds=") {
        // The crate rejects rounds below 1000 where glibc would clamp them, so refuse those here too.
        first
            .as_str()
            .parse::<Params>()
            .map_err(|_| "SHA-512-crypt rounds must be 1000..=999999999".to_string())?;
        // Then the salt: any well-formed field will do (only its first 16 characters are used).
        fields.next().ok_or(BAD)?;
    }
    let digest = fields.next().ok_or(BAD)?;
    let mut buf = [0u8; 64];
    let decoded = digest
        .decode_base64_into(mcf::Base64::Crypt, &mut buf)
        .map_err(|_| BAD.to_string())?;
    if decoded.len() != buf.len() || fields.next().is_some() {
        return Err(BAD.into());
    }
    Ok(())
}

/// Validates a bcrypt string with the crate's own parser, plus the cost range it enforces only when verifying.
fn check_bcrypt(s: &str) -> Result<(), String> {
    let parts: bcrypt::HashParts = s.parse().map_err(|_| {
        "malformed bcrypt hash (crypt(5) id 2a, 2b or 2y: two-digit cost, 53 characters)"
            .to_string()
    })?;
    if !(4..=31).contains(&parts.get_cost()) {
        return Err("bcrypt cost must be 04..=31".into());
    }
    Ok(())
}

/// Constant-time equality for plain passwords. The work depends only on the candidate's length (which the client
/// already knows): every candidate byte is XORed with a secret byte and OR-accumulated, the length difference is
/// folded in, and there is no early exit, so timing reveals neither where a mismatch is nor how long the secret is.
pub(crate) fn ct_eq(candidate: &[u8], secret: &[u8]) -> bool {
    let mut diff = candidate.len() ^ secret.len();
    let n = secret.len().max(1);
    for (i, &c) in candidate.iter().enumerate() {
        // Wrapping around the secret keeps the per-byte work identical for candidates longer than the secret.
        let s = secret.get(i % n).copied().unwrap_or(0);
        // black_box keeps the optimiser from turning the accumulation into a data-dependent early exit.
        diff = std::hint::black_box(diff | usize::from(c ^ s));
    }
    diff == 0
}

/// Proof that a client authenticated. Only [`Users::verify`] creates one (the field is private), so code that
/// needs an authenticated user can demand it by type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authorized {
    /// The user name; for a session login (`alice-session-ID`) `alice NUL ID`, so a plain login shares the table's
    /// `Arc` and a `Conn` pays nothing for the session case (names never contain control characters).
    user: Arc<str>,
}

impl Authorized {
    /// A client authenticated by a certificate that rustls verified against `--tls-client-ca`: its identity is
    /// the user, no password involved. [`CertIdentity`](crate::tls::CertIdentity) can only come from such a
    /// certificate, so this is no way around [`Users::verify`] for password users.
    pub fn from_certificate(id: &crate::tls::CertIdentity) -> Authorized {
        Authorized {
            user: id.name().into(),
        }
    }

    /// The authenticated user name (for a session login, the user it logged in as).
    pub fn user(&self) -> &str {
        self.user.split('\0').next().unwrap_or("")
    }

    /// The session ID of a `NAME-session-ID` login (`session_usernames` in the policy file).
    pub fn session(&self) -> Option<&str> {
        self.user.split_once('\0').map(|(_, id)| id)
    }
}

/// The infix of session logins: `alice-session-42` logs in as alice with session ID 42.
const SESSION_INFIX: &str = "-session-";
/// Longest session ID accepted.
const MAX_SESSION_ID: usize = 64;

/// A users file or `--user` flag that could not be accepted; never contains a password.
#[derive(Debug)]
pub struct UsersError {
    /// 1-based line in the users file, or 0 when the error is not about a line (I/O, `--user` flags).
    pub line: usize,
    /// What was wrong.
    pub message: String,
}

impl UsersError {
    /// An error about line `line` (or 0: none).
    fn new(line: usize, message: impl Into<String>) -> UsersError {
        UsersError {
            line,
            message: message.into(),
        }
    }
}

impl fmt::Display for UsersError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            0 => f.write_str(&self.message),
            n => write!(f, "users file line {n}: {}", self.message),
        }
    }
}

impl std::error::Error for UsersError {}

/// The users allowed to authenticate, with their secrets. `Debug` lists names and secret kinds only.
#[derive(Clone, Default)]
pub struct Users {
    entries: HashMap<Arc<str>, Secret>,
    /// One of the hashed secrets, if any: unknown names are verified against it so that, in a table with hashes,
    /// they cost as much as a real hashed user instead of answering at once.
    decoy: Option<Secret>,
    /// `NAME-session-ID` logs in as NAME (the policy file's `session_usernames`).
    session_names: bool,
}

impl Users {
    /// Parses a users file: one `NAME:PASS` per line, split at the first ':' (the password may contain colons);
    /// blank lines and lines starting with '#' are skipped; whitespace around the line is trimmed (so a password
    /// cannot end in whitespace), CRLF line ends and a leading UTF-8 BOM are accepted. PASS is plain text or a
    /// `$6$`/`$2a$`/`$2b$`/`$2y$` hash. Empty names or passwords, names with surrounding whitespace or control
    /// characters, names over 255 bytes, duplicate names, lines without ':' and malformed or unsupported hashes are
    /// errors naming the line.
    pub fn parse(text: &str) -> Result<Users, UsersError> {
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let mut users = Users::default();
        for (index, raw) in text.lines().enumerate() {
            let line_no = index.saturating_add(1);
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (name, pass) = line
                .split_once(':')
                .ok_or_else(|| UsersError::new(line_no, "missing ':'"))?;
            users
                .insert(name, pass)
                .map_err(|m| UsersError::new(line_no, m))?;
        }
        users.pick_decoy();
        Ok(users)
    }

    /// Reads and parses a users file (see [`Users::parse`]); I/O errors have line 0.
    pub fn load_file(path: &Path) -> Result<Users, UsersError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            UsersError::new(0, format!("cannot read users file {}: {e}", path.display()))
        })?;
        Users::parse(&text)
    }

    /// Builds a table from `--user NAME:PASS` flags, with the same rules as a file line (a PASS that is a hash
    /// is a hash, which keeps plain passwords out of the process list). Errors have line 0 and name the flag.
    pub fn from_pairs(pairs: &[(String, String)]) -> Result<Users, UsersError> {
        let mut users = Users::default();
        for (index, (name, pass)) in pairs.iter().enumerate() {
            users.insert(name, pass).map_err(|m| {
                UsersError::new(0, format!("--user #{}: {m}", index.saturating_add(1)))
            })?;
        }
        users.pick_decoy();
        Ok(users)
    }

    /// Combines two tables; for a name present in both, `other`'s entry wins (so `--user` flags merged over the
    /// file override it).
    pub fn merge(mut self, other: Users) -> Users {
        self.entries.extend(other.entries);
        self.pick_decoy();
        self
    }

    /// True when there are no users (authentication is then not offered).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The number of users.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when `name` is in the table.
    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// Adds one user with the rules of a users-file line (the error names the user at most, never the secret).
    pub fn add(&mut self, name: &str, pass: &str) -> Result<(), String> {
        self.insert(name, pass)?;
        self.pick_decoy();
        Ok(())
    }

    /// True when `name` is in both tables with the same secret: her sessions authenticated with credentials that
    /// are still valid after a reload.
    pub fn same_secret(&self, other: &Users, name: &str) -> bool {
        match (self.entries.get(name), other.entries.get(name)) {
            (Some(a), Some(b)) => a == b,
            _ => false,
        }
    }

    /// Checks a name and password as received on the wire. Returns the proof of authentication on success.
    ///
    /// Plain passwords are compared in constant time. An unknown name (or one that is not UTF-8) is still checked
    /// against a decoy secret, a hashed one if the table has any, so the answer takes as long as for a real user.
    /// Hashed secrets take milliseconds: see [`Users::needs_slow_verify`].
    pub fn verify(&self, user: &[u8], pass: &[u8]) -> Option<Authorized> {
        let found = std::str::from_utf8(user)
            .ok()
            .and_then(|name| self.entries.get_key_value(name));
        if found.is_none() {
            if let Some((name, secret, id)) = self.session_login(user) {
                return secret.matches(pass).then(|| Authorized {
                    user: Arc::from(format!("{name}\0{id}")),
                });
            }
        }
        match found {
            Some((name, secret)) => secret.matches(pass).then(|| Authorized {
                user: Arc::clone(name),
            }),
            None => {
                let spent = match &self.decoy {
                    Some(decoy) => decoy.matches(pass),
                    None => ct_eq(pass, DUMMY_SECRET),
                };
                std::hint::black_box(spent);
                None
            }
        }
    }

    /// True when [`Users::verify`] for this name runs a password hash (bcrypt or SHA-512-crypt take milliseconds,
    /// so the event loop hands such checks to a worker thread). Unknown names answer like hashed users whenever
    /// the table has any hash, since they are verified against a hashed decoy.
    pub fn needs_slow_verify(&self, user: &[u8]) -> bool {
        match std::str::from_utf8(user)
            .ok()
            .and_then(|name| self.entries.get(name))
        {
            Some(secret) => secret.is_hash(),
            None => match self.session_login(user) {
                Some((_, secret, _)) => secret.is_hash(),
                None => self.decoy.is_some(),
            },
        }
    }

    /// Lets `NAME-session-ID` log in as NAME (ID: 1 to 64 letters, digits, '-' or '_'); a user whose own name has
    /// that shape still logs in as herself.
    pub fn set_session_names(&mut self, on: bool) {
        self.session_names = on;
    }

    /// The user, her secret and the session ID of a session login, when session names are on.
    fn session_login<'a>(&'a self, user: &'a [u8]) -> Option<(&'a str, &'a Secret, &'a str)> {
        if !self.session_names {
            return None;
        }
        let user = std::str::from_utf8(user).ok()?;
        user.match_indices(SESSION_INFIX).find_map(|(i, _)| {
            let (name, rest) = (user.get(..i)?, user.get(i + SESSION_INFIX.len()..)?);
            let id_ok = !rest.is_empty()
                && rest.len() <= MAX_SESSION_ID
                && rest
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            let (name, secret) = self.entries.get_key_value(name)?;
            id_ok.then_some((&**name, secret, rest))
        })
    }

    /// Validates and adds one entry; the error message names the user at most, never the secret.
    fn insert(&mut self, name: &str, pass: &str) -> Result<(), String> {
        if name.is_empty() {
            return Err("empty user name".into());
        }
        if name.trim() != name {
            return Err(format!("user name {name:?} has surrounding whitespace"));
        }
        if name.chars().any(char::is_control) {
            return Err("user name contains control characters".into());
        }
        if name.len() > MAX_NAME_LEN {
            return Err(format!("user name longer than {MAX_NAME_LEN} bytes"));
        }
        if self.entries.contains_key(name) {
            return Err(format!("duplicate user name {name:?}"));
        }
        let secret = Secret::parse(pass).map_err(|m| format!("user {name:?}: {m}"))?;
        self.entries.insert(Arc::from(name), secret);
        Ok(())
    }

    /// Chooses the decoy for unknown names: the hashed secret of the alphabetically first hashed user, so the
    /// choice is deterministic.
    fn pick_decoy(&mut self) {
        self.decoy = self
            .entries
            .iter()
            .filter(|(_, s)| s.is_hash())
            .min_by(|a, b| a.0.cmp(b.0))
            .map(|(_, s)| s.clone());
    }
}

impl fmt::Debug for Users {
    /// Sorted `name: <kind>` pairs; secrets are never shown.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut entries: Vec<_> = self.entries.iter().collect();
        entries.sort_by(|a, b| a.0.cmp(b.0));
        f.debug_struct("Users")
            .field("users", &DebugMap(&entries))
            .finish()
    }
}

/// Formats sorted entries as a map without requiring an ordered container.
struct DebugMap<'a>(&'a [(&'a Arc<str>, &'a Secret)]);

impl fmt::Debug for DebugMap<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.0.iter().map(|(k, v)| (k, v)))
            .finish()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // a failing test should panic
mod tests {
    use super::*;
    use sha_crypt::{Algorithm, PasswordHasher};

    fn err(text: &str) -> UsersError {
        Users::parse(text).expect_err(text)
    }

    fn sha512(pass: &[u8]) -> String {
        ShaCrypt::new(Algorithm::Sha512Crypt, Params::new(1000).unwrap())
            .hash_password_with_salt(pass, b"0123456789ab")
            .unwrap()
            .to_string()
    }

    fn bcrypt_hash(pass: &[u8], version: bcrypt::Version) -> String {
        bcrypt::hash_with_salt(pass, 4, [0x5A; 16])
            .unwrap()
            .format_for_version(version)
    }

    #[test]
    fn session_logins_use_the_users_secret() {
        let hashed = sha512(b"pw");
        let mut users =
            Users::parse(&format!("alice:{hashed}\nbob:plain\nbob-session-x:own\n")).unwrap();
        // Off: an unknown name, verified against the hashed decoy.
        assert!(users.needs_slow_verify(b"bob-session-1"));
        assert!(users.verify(b"bob-session-1", b"plain").is_none());
        users.set_session_names(true);
        assert!(users.needs_slow_verify(b"alice-session-7"));
        let a = users.verify(b"alice-session-7", b"pw").unwrap();
        assert_eq!((a.user(), a.session()), ("alice", Some("7")));
        assert!(!users.needs_slow_verify(b"bob-session-1"));
        assert_eq!(
            users.verify(b"bob-session-1", b"plain").unwrap().user(),
            "bob"
        );
        // A user whose own name looks like a session login is herself, with her own password.
        let own = users.verify(b"bob-session-x", b"own").unwrap();
        assert_eq!((own.user(), own.session()), ("bob-session-x", None));
        assert!(users.verify(b"bob-session-x", b"plain").is_none());
    }

    #[test]
    fn parse_forms() {
        let text = "\u{feff}# comment\r\n\r\n  alice:secret  \r\nbob:pa:ss:word\n\t# indented comment\ncarol: spaced pass\ndave:#notacomment\n\
                    émile:ünïcode\nlast:no-newline";
        let users = Users::parse(text).unwrap();
        assert_eq!(users.len(), 6);
        assert!(!users.is_empty());
        assert!(users.verify(b"alice", b"secret").is_some());
        assert!(users.verify(b"bob", b"pa:ss:word").is_some());
        assert!(users.verify(b"carol", b" spaced pass").is_some());
        assert!(users.verify(b"carol", b"spaced pass").is_none());
        assert!(users.verify(b"dave", b"#notacomment").is_some());
        assert!(users
            .verify("émile".as_bytes(), "ünïcode".as_bytes())
            .is_some());
        assert!(users.verify(b"last", b"no-newline").is_some());
        assert!(!users.needs_slow_verify(b"alice"));
        assert!(!users.needs_slow_verify(b"nobody"));

        let empty = Users::parse("# nothing\n\n   \n").unwrap();
        assert!(empty.is_empty());
        assert_eq!(empty.len(), 0);
        assert!(empty.verify(b"", b"").is_none());
    }

    #[test]
    fn parse_errors_name_the_line() {
        let cases: &[(&str, usize, &str)] = &[
            ("alice\n", 1, "missing ':'"),
            ("# c\n\nalice:x\nbob\n", 4, "missing ':'"),
            ("alice:x\r\n:pw\r\n", 2, "empty user name"),
            (
                "alice:x\nbob:y\nalice:z\n",
                3,
                "duplicate user name \"alice\"",
            ),
            ("alice:\n", 1, "user \"alice\": empty password"),
            ("alice :x\n", 1, "has surrounding whitespace"),
            ("a\u{7}b:x\n", 1, "control characters"),
            ("x:1\ny:$6$salt\n", 2, "malformed SHA-512-crypt"),
            ("y:$6$rounds=999$salt$abc\n", 1, "rounds must be"),
            ("y:$2b$04$tooshort\n", 1, "malformed bcrypt"),
            (
                "y:$1$salt$hash\n",
                1,
                "unsupported password hash scheme, crypt(5) id 1 ",
            ),
            (
                "y:$5$salt$hash\n",
                1,
                "unsupported password hash scheme, crypt(5) id 5 ",
            ),
            ("y:$argon2id$v=19$m=1$abc\n", 1, "id argon2id "),
            ("y:$2x$04$abc\n", 1, "id 2x "),
        ];
        for &(text, line, needle) in cases {
            let e = err(text);
            assert_eq!(e.line, line, "{text:?}: {e}");
            assert!(e.message.contains(needle), "{text:?}: {e}");
            assert!(e
                .to_string()
                .starts_with(&format!("users file line {line}: ")));
        }
        let long = format!("{}:x\n", "n".repeat(256));
        assert_eq!(err(&long).line, 1);
        assert!(Users::parse(&format!("{}:x\n", "n".repeat(255))).is_ok());
        assert_eq!(err("alice\n").to_string(), "users file line 1: missing ':'");
    }

    #[test]
    fn errors_never_show_the_password() {
        let secret = "hunter2-very-secret";
        for text in [
            format!("alice:{secret}\nalice:{secret}\n"),
            format!("alice:$6${secret}\n"),
            format!("alice:$2b$04${secret}\n"),
            format!(" :{secret}\n"),
            format!("a\u{1}:{secret}\n"),
        ] {
            let e = err(&text);
            assert!(!e.to_string().contains("hunter2"), "{e}");
            assert!(!format!("{e:?}").contains("hunter2"), "{e:?}");
        }
    }

    #[test]
    fn load_file_reads_and_reports_io() {
        let path = crate::test_support::scratch_file("scratch_pp_auth", "users", "alice:secret\n");
        let dir = path.parent().unwrap().to_path_buf();
        let users = Users::load_file(&path).unwrap();
        assert!(users.verify(b"alice", b"secret").is_some());
        std::fs::write(&path, "ok:1\nbroken\n").unwrap();
        assert_eq!(Users::load_file(&path).unwrap_err().line, 2);
        std::fs::remove_dir_all(&dir).unwrap();
        let e = Users::load_file(&dir.join("missing")).unwrap_err();
        assert_eq!(e.line, 0);
        assert!(e.to_string().starts_with("cannot read users file "), "{e}");
    }

    #[test]
    fn verify_plain() {
        let users = Users::parse("alice:secret\n").unwrap();
        let ok = users.verify(b"alice", b"secret").unwrap();
        assert_eq!(ok.user(), "alice");
        let near_misses = ["secreT", "secre", "secret!", "secretsecret"];
        let others = ["s", "", "SECRET", "\0"];
        for wrong in near_misses.into_iter().chain(others) {
            let wrong = wrong.as_bytes();
            assert!(users.verify(b"alice", wrong).is_none(), "{wrong:?}");
        }
        assert!(users.verify(b"Alice", b"secret").is_none());
        assert!(users.verify(b"alice ", b"secret").is_none());
        assert!(users.verify(b"nobody", b"secret").is_none());
        assert!(users.verify(b"", b"").is_none());
        assert!(users.verify(b"\xff\xfe", b"secret").is_none());
    }

    #[test]
    fn constant_time_compare() {
        assert!(ct_eq(b"abc", b"abc"));
        assert!(ct_eq(b"", b""));
        assert!(!ct_eq(b"abc", b"abd"));
        assert!(!ct_eq(b"ab", b"abc"));
        assert!(!ct_eq(b"abcabc", b"abc"));
        assert!(!ct_eq(b"", b"abc"));
        assert!(!ct_eq(b"abc", b""));
        assert!(!ct_eq(&[0; 3], b""));
    }

    #[test]
    fn sha512_crypt() {
        let hash = sha512(b"correct horse");
        assert!(hash.starts_with("$6$rounds=1000$"), "{hash}");
        let users = Users::parse(&format!("alice:{hash}\nbob:plain\n")).unwrap();
        assert_eq!(
            users.verify(b"alice", b"correct horse").unwrap().user(),
            "alice"
        );
        assert!(users.verify(b"alice", b"correct horse!").is_none());
        assert!(users.verify(b"alice", b"").is_none());
        // The hash text is not the password.
        assert!(users.verify(b"alice", hash.as_bytes()).is_none());
        assert!(users.needs_slow_verify(b"alice"));
        assert!(!users.needs_slow_verify(b"bob"));
        // With a hash in the table, unknown names take the slow path too.
        assert!(users.needs_slow_verify(b"nobody"));
        assert!(users.verify(b"nobody", b"correct horse").is_none());

        // Interoperability: glibc's published test vectors (crypt-sha512 by Ulrich Drepper).
        let glibc = Users::parse(
            "a:$6$saltstring$svn8UoSVapNtMuq1ukKS4tPQd8iKwSMHWjl/O817G3uBnIFNjnQJuesI68u4OTLiBFdcbYEdFCoEOfaS35inz1\n\
             b:$6$rounds=10000$saltstringsaltst$OW1/O6BYHV6BcXZu8QVeXbDWra3Oeqh0sbHbbMCVNSnCM/UrjmM0Dp8vOuZeHBy/YTBmSK6H9qs/y3RnOaw5v.\n",
        )
        .unwrap();
        assert!(glibc.verify(b"a", b"Hello world!").is_some());
        assert!(glibc.verify(b"a", b"Hello world").is_none());
        assert!(glibc.verify(b"b", b"Hello world!").is_some());

        // Malformed variants of a valid hash are load-time errors.
        let digest = hash.rsplit('$').next().unwrap();
        for bad in [
            format!("$6$rounds=1000$0123456789ab${}", &digest[1..]),
            format!("$6$rounds=1000$0123456789ab${digest}x"),
            format!("$6$rounds=1000$0123456789ab${digest}$"),
            format!("$6$rounds=1000$0123456789ab${digest}$extra"),
            format!("$6$rounds=1000000000$0123456789ab${digest}"),
            format!("$6$0123456789ab${digest}!"),
            "$6$".to_string(),
            "$6$$".to_string(),
            format!("$6$${digest}"),
        ] {
            let e = err(&format!("alice:{bad}\n"));
            assert_eq!(e.line, 1, "{bad}");
        }
    }

    #[test]
    fn bcrypt() {
        for version in [
            bcrypt::Version::TwoB,
            bcrypt::Version::TwoA,
            bcrypt::Version::TwoY,
        ] {
            let hash = bcrypt_hash(b"tr0ub4dor&3", version);
            let users = Users::parse(&format!("bob:{hash}\n")).unwrap();
            assert_eq!(users.verify(b"bob", b"tr0ub4dor&3").unwrap().user(), "bob");
            assert!(users.verify(b"bob", b"tr0ub4dor&4").is_none());
            assert!(users.verify(b"bob", b"").is_none());
            assert!(users.needs_slow_verify(b"bob"));
            assert!(users.needs_slow_verify(b"ghost"));
            assert!(users.verify(b"ghost", b"tr0ub4dor&3").is_none());
        }
        // Interoperability: a vector from Openwall's crypt_blowfish test suite.
        let ow = Users::parse("u:$2a$05$CCCCCCCCCCCCCCCCCCCCC.E5YPO9kmyuRGyh0XouQYb4YMJKvyOeW\n")
            .unwrap();
        assert!(ow.verify(b"u", b"U*U").is_some());
        assert!(ow.verify(b"u", b"U*V").is_none());

        let hash = bcrypt_hash(b"x", bcrypt::Version::TwoB);
        for bad in [
            hash.replace("$04$", "$03$"),
            hash.replace("$04$", "$32$"),
            hash.replace("$04$", "$4x$"),
            hash[..59].to_string(),
            format!("{hash}a"),
            hash.replace(['.', 'O'], "!"),
        ] {
            let e = err(&format!("bob:{bad}\n"));
            assert_eq!(e.line, 1, "{bad}");
        }
    }

    #[test]
    fn pairs_and_merge() {
        let pairs = vec![
            ("alice".to_string(), "one".to_string()),
            (
                "bob".to_string(),
                bcrypt_hash(b"two", bcrypt::Version::TwoB),
            ),
        ];
        let flags = Users::from_pairs(&pairs).unwrap();
        assert_eq!(flags.len(), 2);
        assert!(flags.verify(b"alice", b"one").is_some());
        assert!(flags.verify(b"bob", b"two").is_some());

        let file = Users::parse("alice:old\ncarol:three\n").unwrap();
        assert!(!file.needs_slow_verify(b"nobody"));
        let merged = file.merge(flags);
        assert_eq!(merged.len(), 3);
        assert!(merged.verify(b"alice", b"one").is_some());
        assert!(merged.verify(b"alice", b"old").is_none());
        assert!(merged.verify(b"carol", b"three").is_some());
        assert!(merged.needs_slow_verify(b"nobody"));

        let dup = vec![
            ("a".to_string(), "1".to_string()),
            ("a".to_string(), "2".to_string()),
        ];
        let e = Users::from_pairs(&dup).unwrap_err();
        assert_eq!(e.line, 0);
        assert_eq!(e.to_string(), "--user #2: duplicate user name \"a\"");
        assert!(Users::from_pairs(&[(String::new(), "x".to_string())]).is_err());
        assert!(Users::from_pairs(&[("a".to_string(), String::new())]).is_err());
        assert!(Users::from_pairs(&[("a".to_string(), "$6$bad".to_string())]).is_err());
        assert!(Users::from_pairs(&[]).unwrap().is_empty());
    }

    #[test]
    fn debug_hides_secrets() {
        let hash = sha512(b"pw-in-hash");
        let b = bcrypt_hash(b"x", bcrypt::Version::TwoB);
        let users = Users::parse(&format!("zed:plain-secret-1\nalice:{hash}\nbob:{b}\n")).unwrap();
        let shown = format!("{users:?}");
        assert_eq!(
            shown,
            "Users { users: {\"alice\": <sha512-crypt>, \"bob\": <bcrypt>, \"zed\": <plain>} }"
        );
        assert!(!shown.contains("plain-secret-1"));
        assert!(!shown.contains(&hash));
        assert!(!shown.contains(&b));
        let pretty = format!("{users:#?}");
        assert!(!pretty.contains("plain-secret-1") && !pretty.contains('$'));
        let auth = users.verify(b"zed", b"plain-secret-1").unwrap();
        assert!(!format!("{auth:?}").contains("plain-secret-1"));
    }
}

#[cfg(test)]
mod message_regressions {
    /// Found by fuzzing: a malformed "hash" may be a password, so messages must not spell out formats that could
    /// contain it.
    #[test]
    fn malformed_hash_messages_do_not_echo_the_secret() {
        for (text, secret) in [
            ("bu:$6$[\n", "$6$["),
            ("bu:$2b$CC$\n", "$2b$CC$"),
            ("bu:$6$S\n", "$6$S"),
            ("y%:$1$\"\n", "$1$\""),
        ] {
            let e = super::Users::parse(text).unwrap_err();
            assert!(
                !e.message.contains(secret),
                "{:?} quotes {secret:?}",
                e.message
            );
        }
    }
}
