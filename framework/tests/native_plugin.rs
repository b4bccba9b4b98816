//! Native plugins: the echo plugin built for the host, and a library built against an older
//! ABI (both from `plugins/`, built by `scripts/build-plugins.sh`).

#![cfg(feature = "plugin-host")]

use std::sync::Arc;

use canopy::plugin::{Effect, Limits, MemoryState, NativeTemplate, PluginError, Runtime, RuntimeOptions, Supervisor};
use canopy::{Chunk, Name};

#[path = "support/plugin_artifacts.rs"]
mod plugin_artifacts;
use plugin_artifacts::native;

#[test]
fn the_echo_plugin_runs_natively_from_the_same_source() {
    let echo = NativeTemplate::load(&native("echo"), Limits::default()).unwrap();
    let config = r#"{"requests": "0x01000000000000000000000000000000/16", "replies": "0x02000000000000000000000000000000/16"}"#;
    let mut p =
        Supervisor::start("echo", echo, config, Box::new(MemoryState::new()), Arc::new(|| 1_000)).unwrap();
    assert_eq!(p.take_effects(), vec![Effect::Subscribe("0x01000000000000000000000000000000/16".parse().unwrap())]);
    let request = Chunk::new(Name::new(0x0100_u128 << 112 | 9), 5_000, &b"native"[..]).unwrap();
    p.on_chunks(&[request]);
    let reply = Chunk::new(Name::new(0x0200_u128 << 112 | 9), 5_000, &b"native"[..]).unwrap();
    assert_eq!(p.take_effects(), vec![Effect::Publish(reply)]);
    assert_eq!(p.command(&["stats".into()]).unwrap(), Ok("answered 1".into()));
    // The plugin's refusal of a bad configuration crosses the boundary intact.
    let echo = NativeTemplate::load(&native("echo"), Limits::default()).unwrap();
    let err = Supervisor::start("echo", echo, "{}", Box::new(MemoryState::new()), Arc::new(|| 0)).err().unwrap();
    assert!(matches!(&err, PluginError::Init { message, .. } if message.contains("requests")), "{err}");
}

#[test]
fn a_library_built_against_another_abi_version_is_refused_naming_both() {
    let err = NativeTemplate::load(&native("stale_abi"), Limits::default()).err().expect("refused");
    assert!(matches!(err, PluginError::AbiMismatch { found: 0, expected: 1, .. }), "{err}");
    let text = err.to_string();
    assert!(text.contains("ABI version 0") && text.contains("speaks version 1"), "{text}");
}

#[test]
fn the_runtime_picks_the_kind_from_the_extension_and_keeps_dirs_for_wasm() {
    let rt = Runtime::new(RuntimeOptions::default()).unwrap();
    let dir = std::env::temp_dir();
    let err = rt.load_plugin(&native("echo"), None, Limits::default(), &[dir]).err().unwrap();
    assert!(matches!(err, PluginError::Unsupported(_)), "{err}");
    assert!(rt.load_plugin(&native("echo"), None, Limits::default(), &[]).is_ok());
}
