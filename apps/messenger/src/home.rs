//! A device's home directory: its configuration, its key, and where each process keeps its
//! state, sockets, pid and log.

use std::io::IsTerminal as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use canopy_msg_core::Key;
use serde::{Deserialize, Serialize};

/// The home's `config.toml`, written by `init`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Config {
    /// The relay this device's Network connects to, `HOST:PORT`.
    pub relay: String,
    /// PEM file trusted for the relay (a copy kept in the home).
    pub ca: Option<PathBuf>,
    /// Or the relay certificate's SHA-256 fingerprint, pinned.
    pub fingerprint: Option<String>,
    /// The token presented to the relay.
    pub token: Option<String>,
    /// The org's domain; its hash is the names' origin field.
    pub domain: String,
    /// The org number.
    pub org: u32,
    /// The clock's filter (published by the `clock` plugin), if time comes by subscription.
    pub clock: Option<String>,
    /// `passphrase` or `key-file`: where the key that seals this home's state comes from.
    pub key: String,
}

/// Paths of one home.
#[derive(Debug, Clone)]
pub struct Home {
    /// The directory.
    pub dir: PathBuf,
}

/// How the home's state key is obtained.
pub const PASSPHRASE_ENV: &str = "CANOPY_MSG_PASSPHRASE";

impl Home {
    /// The home at `dir`, or `$CANOPY_MSG_HOME`, or the platform data directory.
    pub fn locate(dir: Option<PathBuf>) -> anyhow::Result<Home> {
        let dir = match dir {
            Some(d) => d,
            None => match std::env::var_os("CANOPY_MSG_HOME") {
                Some(d) if !d.is_empty() => PathBuf::from(d),
                _ => match std::env::var_os("XDG_DATA_HOME") {
                    Some(d) if !d.is_empty() => PathBuf::from(d).join("canopy-msg"),
                    _ => PathBuf::from(std::env::var_os("HOME").context("HOME is not set; pass --home")?).join(".local/share/canopy-msg"),
                },
            },
        };
        Ok(Home { dir })
    }

    /// A path in the home.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }

    /// `config.toml`.
    pub fn config_path(&self) -> PathBuf {
        self.path("config.toml")
    }

    /// Reads the configuration; a clear error if `init` has not run.
    pub fn config(&self) -> anyhow::Result<Config> {
        let path = self.config_path();
        if !path.exists() {
            bail!("{} is not initialised: run `canopy-msg init` first", self.dir.display());
        }
        use figment::providers::{Format as _, Toml};
        figment::Figment::new().merge(Toml::file(&path)).extract().with_context(|| format!("reading {}", path.display()))
    }

    /// Creates the home (0700) and writes the configuration.
    pub fn write_config(&self, config: &Config) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.dir).with_context(|| format!("creating {}", self.dir.display()))?;
        std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o700))?;
        for sub in ["run", "logs"] {
            std::fs::create_dir_all(self.path(sub))?;
        }
        std::fs::write(self.config_path(), toml_of(config)).context("writing config.toml")
    }

    /// The state key, for the processes that open sealed state (Secure, and the admin's
    /// member plugin): from the passphrase, or from the key file.
    pub fn key(&self, config: &Config) -> anyhow::Result<Key> {
        if config.key == "passphrase" {
            let salt: [u8; 16] = std::fs::read(self.path("salt")).context("reading the salt")?.try_into().map_err(|_| anyhow::anyhow!("the salt file is damaged"))?;
            let pass = passphrase(false)?;
            Ok(Key::from_passphrase(pass.as_bytes(), &salt)?)
        } else {
            let bytes: [u8; 32] = std::fs::read(self.path("key")).context("reading the key file")?.try_into().map_err(|_| anyhow::anyhow!("the key file is damaged"))?;
            Ok(Key::from_bytes(bytes))
        }
    }

    /// Chooses and sets up the key at `init`: a passphrase if one is given
    /// ($CANOPY_MSG_PASSPHRASE, or typed at a terminal), else a random 0600 key file.
    pub fn setup_key(&self) -> anyhow::Result<&'static str> {
        if self.path("key").exists() || self.path("salt").exists() {
            // Keep the key of existing state; a second init only rewrites the config.
            return Ok(if self.path("salt").exists() { "passphrase" } else { "key-file" });
        }
        let given = std::env::var(PASSPHRASE_ENV).ok().filter(|p| !p.is_empty());
        let pass = match given {
            Some(p) => Some(p),
            None if std::io::stdin().is_terminal() => {
                let p = rpassword::prompt_password("passphrase for this device's state (empty for a key file): ")?;
                (!p.is_empty()).then_some(p)
            }
            None => None,
        };
        if pass.is_some() {
            write_private(&self.path("salt"), &Key::random_salt())?;
            Ok("passphrase")
        } else {
            write_private(&self.path("key"), &Key::random().to_bytes())?;
            Ok("key-file")
        }
    }
}

/// The passphrase, from the environment or a prompt.
pub fn passphrase(confirm: bool) -> anyhow::Result<String> {
    if let Some(p) = std::env::var(PASSPHRASE_ENV).ok().filter(|p| !p.is_empty()) {
        return Ok(p);
    }
    if std::io::stdin().is_terminal() {
        let p = rpassword::prompt_password("passphrase: ")?;
        if confirm && rpassword::prompt_password("again: ")? != p {
            bail!("the passphrases differ");
        }
        return Ok(p);
    }
    bail!("this home's state is sealed with a passphrase: set {PASSPHRASE_ENV} or run on a terminal")
}

/// The environment variable a backup's passphrase is read from.
pub const BACKUP_PASSPHRASE_ENV: &str = "CANOPY_MSG_BACKUP_PASSPHRASE";

/// A backup's passphrase, from the environment or a prompt (asked twice when `confirm`).
pub fn backup_passphrase(confirm: bool) -> anyhow::Result<String> {
    if let Some(p) = std::env::var(BACKUP_PASSPHRASE_ENV).ok().filter(|p| !p.is_empty()) {
        return Ok(p);
    }
    if std::io::stdin().is_terminal() {
        let p = rpassword::prompt_password("backup passphrase: ")?;
        if p.is_empty() {
            bail!("a backup needs a passphrase");
        }
        if confirm && rpassword::prompt_password("again: ")? != p {
            bail!("the passphrases differ");
        }
        return Ok(p);
    }
    bail!("a backup is sealed with a passphrase: set {BACKUP_PASSPHRASE_ENV} or run on a terminal")
}

fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).with_context(|| format!("creating {}", path.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    Ok(())
}

fn toml_of(c: &Config) -> String {
    let q = |s: &str| serde_json::to_string(s).expect("a string serializes");
    let mut out = format!("relay = {}\ndomain = {}\norg = {}\nkey = {}\n", q(&c.relay), q(&c.domain), c.org, q(&c.key));
    if let Some(ca) = &c.ca {
        out += &format!("ca = {}\n", q(&ca.to_string_lossy()));
    }
    if let Some(fp) = &c.fingerprint {
        out += &format!("fingerprint = {}\n", q(fp));
    }
    if let Some(t) = &c.token {
        out += &format!("token = {}\n", q(t));
    }
    if let Some(clock) = &c.clock {
        out += &format!("clock = {}\n", q(clock));
    }
    out
}
