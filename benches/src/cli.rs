//! Running the real `canopy-msg` from a bench binary: it sits next to the bench in the
//! Cargo target directory (`cargo build --release -p canopy-messenger`).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail};

/// The directory of this bench binary (and of `canopy-msg`).
pub fn exe_dir() -> PathBuf {
    std::env::current_exe().expect("the bench knows its path").parent().expect("in a directory").to_path_buf()
}

/// Runs `canopy-msg --home HOME args…` and returns its stdout, trimmed; its stderr as the
/// error if it fails.
pub fn msg(home: &Path, args: &[&str]) -> anyhow::Result<String> {
    let plugin = exe_dir().join("../wasm32-wasip2/plugin/member.wasm");
    let out = Command::new(exe_dir().join("canopy-msg"))
        .arg("--home")
        .arg(home)
        .args(args)
        .env("CANOPY_MSG_MEMBER_PLUGIN", plugin)
        .output()
        .context("running canopy-msg (build it: cargo build --release -p canopy-messenger)")?;
    if !out.status.success() {
        bail!("canopy-msg {args:?}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8(out.stdout)?.trim().to_string())
}

/// Runs `canopy-msg down` for each home when dropped, so no device outlives the bench.
pub struct Down(pub Vec<PathBuf>);

impl Drop for Down {
    fn drop(&mut self) {
        for home in &self.0 {
            if home.join("config.toml").exists() {
                let _ = msg(home, &["down"]);
            }
        }
    }
}
