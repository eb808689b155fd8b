//! API keys: the managed keys file, its secrets (stored only as salted
//! SHA-256 hashes), and the live set the daemon checks requests against,
//! re-read when the file changes.
//!
//! A secret is 32 random bytes, so a fast salted hash is enough: there is
//! no password to guess. Comparison is constant-time.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use anyhow::{bail, Context, Result};
use base64::Engine;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::{Period, Principal, Scope};

/// Every secret starts with this, so leaked keys are easy to search for.
const SECRET_PREFIX: &str = "kdl-";
/// Characters of the secret kept in the file to tell keys apart.
const HINT_CHARS: usize = 10;

/// One key in the keys file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyEntry {
    /// The key's name: usage records and metrics carry it, never the secret.
    pub name: String,
    /// `sha256$<salt hex>$<digest hex>` of the secret.
    pub hash: String,
    /// The secret's first characters, to recognise it.
    pub hint: String,
    /// What the key may call.
    #[serde(default)]
    pub scope: Scope,
    /// Models the key may use (all when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub models: Option<Vec<String>>,
    /// Requests per minute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpm: Option<u64>,
    /// Tokens (prompt + completion + embedding) per minute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm: Option<u64>,
    /// Tokens per quota period.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota_tokens: Option<u64>,
    /// The quota's period.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota_period: Option<Period>,
    /// When it was made (RFC 3339).
    pub created: String,
    /// When it was revoked; revoked keys stay listed for the record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked: Option<String>,
}

/// The keys file: `[[keys]]` tables.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeysFile {
    /// The keys, in the order they were made.
    #[serde(default)]
    pub keys: Vec<KeyEntry>,
}

/// What `kindling keys create` asks for.
#[derive(Debug, Clone, Default)]
pub struct NewKey {
    pub name: String,
    pub scope: Scope,
    pub models: Option<Vec<String>>,
    pub rpm: Option<u64>,
    pub tpm: Option<u64>,
    pub quota_tokens: Option<u64>,
    pub quota_period: Option<Period>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

fn digest(salt: &[u8], secret: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(salt);
    h.update(secret.as_bytes());
    h.finalize().into()
}

/// A fresh secret.
pub fn new_secret() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    format!(
        "{SECRET_PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    )
}

/// The stored form of `secret`, with a fresh salt.
pub fn hash_secret(secret: &str) -> String {
    let mut salt = [0u8; 16];
    rand::rng().fill_bytes(&mut salt);
    format!("sha256${}${}", hex(&salt), hex(&digest(&salt, secret)))
}

/// A stored hash, parsed once when the file is read.
#[derive(Debug, Clone)]
struct Hashed {
    salt: Vec<u8>,
    digest: [u8; 32],
}

impl Hashed {
    fn parse(s: &str) -> Option<Self> {
        let mut parts = s.split('$');
        if parts.next() != Some("sha256") {
            return None;
        }
        let salt = unhex(parts.next()?)?;
        let digest: [u8; 32] = unhex(parts.next()?)?.try_into().ok()?;
        parts.next().is_none().then_some(Self { salt, digest })
    }

    fn matches(&self, secret: &str) -> bool {
        bool::from(digest(&self.salt, secret).ct_eq(&self.digest))
    }
}

/// Checks a name: it becomes a metric label and a usage column.
fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !ok {
        bail!("key name `{name}`: use 1-64 letters, digits, `-`, `_` or `.`");
    }
    if name.starts_with("api-key-") || name == super::ANONYMOUS {
        bail!("key name `{name}` is reserved");
    }
    Ok(())
}

impl KeysFile {
    /// Reads `path`; a missing file is an empty one.
    pub fn read(path: &Path) -> Result<Self> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        let file: Self = toml::from_str(&text)
            .with_context(|| format!("invalid keys file {}", path.display()))?;
        let mut names = BTreeSet::new();
        for k in &file.keys {
            if !names.insert(k.name.as_str()) {
                bail!("{}: key `{}` appears twice", path.display(), k.name);
            }
            if Hashed::parse(&k.hash).is_none() {
                bail!("{}: key `{}`: unreadable `hash`", path.display(), k.name);
            }
        }
        Ok(file)
    }

    /// Writes `path` whole (a new file renamed over the old one, readable
    /// by its owner only), so the daemon never reads half of it.
    pub fn write(&self, path: &Path) -> Result<()> {
        let text = format!(
            "# Kindling API keys. Edit with `kindling keys`; only salted hashes of the secrets are kept.\n\n{}",
            toml::to_string(self)?
        );
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let tmp = path.with_extension("toml.tmp");
        std::fs::write(&tmp, text).with_context(|| format!("cannot write {}", tmp.display()))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
        }
        std::fs::rename(&tmp, path).with_context(|| format!("cannot replace {}", path.display()))
    }

    /// Adds a key; returns its secret (shown once, never stored).
    pub fn create(&mut self, new: NewKey, now: &str) -> Result<String> {
        check_name(&new.name)?;
        if self.keys.iter().any(|k| k.name == new.name) {
            bail!(
                "a key named `{}` exists (revoked keys keep their name)",
                new.name
            );
        }
        if new.quota_tokens.is_some() != new.quota_period.is_some() {
            bail!("--quota-tokens and --quota-period go together");
        }
        let secret = new_secret();
        self.keys.push(KeyEntry {
            name: new.name,
            hash: hash_secret(&secret),
            hint: secret.chars().take(HINT_CHARS).collect(),
            scope: new.scope,
            models: new.models,
            rpm: new.rpm,
            tpm: new.tpm,
            quota_tokens: new.quota_tokens,
            quota_period: new.quota_period,
            created: now.to_string(),
            revoked: None,
        });
        Ok(secret)
    }

    /// Marks a key revoked.
    pub fn revoke(&mut self, name: &str, now: &str) -> Result<()> {
        match self.keys.iter_mut().find(|k| k.name == name) {
            Some(k) if k.revoked.is_some() => bail!("key `{name}` is already revoked"),
            Some(k) => {
                k.revoked = Some(now.to_string());
                Ok(())
            }
            None => bail!("no key named `{name}`"),
        }
    }
}

/// One key the daemon accepts.
struct Live {
    hashed: Hashed,
    principal: Arc<Principal>,
}

/// The keys in force.
#[derive(Default)]
struct KeySet {
    keys: Vec<Live>,
}

impl KeySet {
    fn build(cli: &[String], file: &KeysFile) -> Self {
        let mut keys: Vec<Live> = cli
            .iter()
            .enumerate()
            .map(|(i, secret)| {
                // Hashed like the file's, so one path checks both.
                let salt = format!("cli-{i}").into_bytes();
                Live {
                    hashed: Hashed {
                        digest: digest(&salt, secret),
                        salt,
                    },
                    principal: Arc::new(Principal::full_access(&format!("api-key-{}", i + 1))),
                }
            })
            .collect();
        keys.extend(
            file.keys
                .iter()
                .filter(|k| k.revoked.is_none())
                .filter_map(|k| {
                    Some(Live {
                        hashed: Hashed::parse(&k.hash)?,
                        principal: Arc::new(Principal::from_entry(k)),
                    })
                }),
        );
        Self { keys }
    }
}

/// The live key set, re-read when its file changes.
pub struct KeyRing {
    cli: Vec<String>,
    file: Option<PathBuf>,
    set: RwLock<Arc<KeySet>>,
    seen: std::sync::Mutex<Option<(SystemTime, u64)>>,
}

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

impl KeyRing {
    /// Keys from the command line plus those in `file`. A file that cannot
    /// be read fails start-up.
    pub fn new(cli: Vec<String>, file: Option<PathBuf>) -> Result<Self> {
        let ring = Self {
            cli,
            file,
            set: RwLock::new(Arc::new(KeySet::default())),
            seen: std::sync::Mutex::new(None),
        };
        ring.reload()?;
        Ok(ring)
    }

    fn reload(&self) -> Result<usize> {
        let stamp = self.file.as_deref().and_then(stamp);
        let file = match &self.file {
            Some(p) => KeysFile::read(p)?,
            None => KeysFile::default(),
        };
        let set = Arc::new(KeySet::build(&self.cli, &file));
        let n = set.keys.len();
        *self.set.write().unwrap_or_else(|e| e.into_inner()) = set;
        *self.seen.lock().unwrap_or_else(|e| e.into_inner()) = stamp;
        Ok(n)
    }

    /// Re-reads the file if it changed since it was last read. A file that
    /// fails to parse is logged and the keys in force stay.
    pub fn refresh(&self) {
        let Some(path) = &self.file else { return };
        let now = stamp(path);
        if now == *self.seen.lock().unwrap_or_else(|e| e.into_inner()) {
            return;
        }
        match self.reload() {
            Ok(n) => tracing::info!(file = %path.display(), keys = n, "keys file reloaded"),
            Err(e) => {
                // Do not retry the same broken file every tick.
                *self.seen.lock().unwrap_or_else(|e| e.into_inner()) = now;
                tracing::error!(error = %format!("{e:#}"), "keys file not reloaded; the keys in force stay");
            }
        }
    }

    /// The key `secret` belongs to, if it is in force.
    pub fn find(&self, secret: &str) -> Option<Arc<Principal>> {
        let set = self.set.read().unwrap_or_else(|e| e.into_inner()).clone();
        // Every key is checked, so timing does not say which one matched.
        let mut found = None;
        for k in &set.keys {
            if k.hashed.matches(secret) && found.is_none() {
                found = Some(k.principal.clone());
            }
        }
        found
    }

    /// Every key in force.
    pub fn principals(&self) -> Vec<Arc<Principal>> {
        let set = self.set.read().unwrap_or_else(|e| e.into_inner()).clone();
        set.keys.iter().map(|k| k.principal.clone()).collect()
    }

    /// The managed keys file, if there is one.
    pub fn file(&self) -> Option<&Path> {
        self.file.as_deref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_stored_hashed_and_checked_against_the_hash() {
        let mut file = KeysFile::default();
        let new = NewKey {
            name: "alice".into(),
            ..NewKey::default()
        };
        let secret = file.create(new.clone(), "t").unwrap();
        assert!(secret.starts_with(SECRET_PREFIX) && secret.len() > 40);
        let text = toml::to_string(&file).unwrap();
        assert!(!text.contains(&secret[HINT_CHARS..]), "{text}");
        assert!(file.create(new, "t").is_err(), "names are unique");
        let set = KeySet::build(&["plain".into()], &file);
        let find = |s: &str| {
            set.keys
                .iter()
                .find(|k| k.hashed.matches(s))
                .map(|k| k.principal.name.to_string())
        };
        assert_eq!(find(&secret).as_deref(), Some("alice"));
        assert_eq!(find("plain").as_deref(), Some("api-key-1"));
        assert_eq!(find("kdl-wrong"), None);
        file.revoke("alice", "t2").unwrap();
        assert!(file.revoke("alice", "t3").is_err());
        let set = KeySet::build(&[], &file);
        assert!(set.keys.is_empty(), "a revoked key is not in force");
        assert!(check_name("a b").is_err() && check_name("api-key-3").is_err());
    }
}
