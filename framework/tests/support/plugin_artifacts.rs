//! Where `scripts/build-plugins.sh` puts the built plugins, as seen from a test or bench binary.
//!
//! The framework's, relay's and SDK's test suites and the plugin bench all include this one
//! file (`#[path]`), so the layout is written down once.
#![allow(dead_code)]

use std::path::PathBuf;

/// The Cargo target directory this binary was built in (`<target>/<profile>/deps/<exe>`).
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.ancestors().nth(3).unwrap().to_owned()
}

/// A built Wasm plugin: `<name>.wasm` in `CANOPY_PLUGIN_DIR` if set, else in
/// `<target>/wasm32-wasip2/plugin/`.
pub fn wasm(name: &str) -> PathBuf {
    let dir = std::env::var_os("CANOPY_PLUGIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| target_dir().join("wasm32-wasip2/plugin"));
    existing(dir.join(format!("{name}.wasm")))
}

/// A native plugin library built in this binary's profile directory (`<target>/<profile>/`).
pub fn native(crate_name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.ancestors().nth(2).unwrap();
    let file = format!("{}{}{}", std::env::consts::DLL_PREFIX, crate_name, std::env::consts::DLL_SUFFIX);
    existing(dir.join(file))
}

fn existing(path: PathBuf) -> PathBuf {
    assert!(
        path.is_file(),
        "{} is missing: run scripts/build-plugins.sh (with --release for benches)",
        path.display()
    );
    path
}
