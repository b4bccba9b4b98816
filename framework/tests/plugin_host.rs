//! The plugin host against real guests: the `echo`, `clock` and `hostile` Wasm components
//! from `plugins/` (built by `scripts/build-plugins.sh`).

#![cfg(feature = "plugin-host")]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use canopy::plugin::{
    Clock, Effect, FaultKind, Limits, MemoryState, PluginError, Runtime, RuntimeOptions, StateStore, Supervisor,
    Template,
};
use canopy::{Chunk, Filter, FjallStore, Name};

#[path = "support/plugin_artifacts.rs"]
mod plugin_artifacts;
use plugin_artifacts::wasm;

fn runtime() -> Runtime {
    Runtime::new(RuntimeOptions::default()).unwrap()
}

fn load(rt: &Runtime, name: &str, limits: Limits) -> Arc<dyn Template> {
    rt.load_file(&wasm(name), limits, &[]).unwrap()
}

fn clock_at(ms: u64) -> (Arc<AtomicU64>, Clock) {
    let now = Arc::new(AtomicU64::new(ms));
    let read = now.clone();
    (now, Arc::new(move || read.load(Ordering::SeqCst)))
}

fn filter(s: &str) -> Filter {
    s.parse().unwrap()
}

fn command(p: &mut Supervisor, cmd: &str) -> Result<Result<String, String>, PluginError> {
    p.command(&[cmd.to_owned()])
}

fn ok(p: &mut Supervisor, cmd: &str) -> String {
    command(p, cmd).unwrap().unwrap()
}

fn fault_kind(err: PluginError) -> FaultKind {
    match err {
        PluginError::Fault { fault, .. } => fault.kind,
        other => panic!("expected a fault, got {other}"),
    }
}

#[test]
fn echo_answers_requests_under_its_reply_filter() {
    let rt = runtime();
    let config =
        r#"{"requests": "0x01000000000000000000000000000000/16", "replies": "0x02000000000000000000000000000000/16"}"#;
    let (_, clock) = clock_at(1_000);
    let mut echo =
        Supervisor::start("echo", load(&rt, "echo", Limits::default()), config, Box::new(MemoryState::new()), clock)
            .unwrap();
    assert_eq!(echo.take_effects(), vec![Effect::Subscribe(filter("0x01000000000000000000000000000000/16"))]);

    let request = Chunk::new(Name::new(0x0100_u128 << 112 | 42), 9_000, &b"ping"[..]).unwrap();
    echo.on_chunks(std::slice::from_ref(&request));
    let reply = Chunk::new(Name::new(0x0200_u128 << 112 | 42), 9_000, &b"ping"[..]).unwrap();
    assert_eq!(echo.take_effects(), vec![Effect::Publish(reply)]);
    assert_eq!(ok(&mut echo, "stats"), "answered 1");
    assert_eq!(echo.stats().chunks_in, 1);
    assert_eq!(echo.stats().published, 1);
}

#[test]
fn a_bad_configuration_is_refused_with_the_plugins_reason() {
    let rt = runtime();
    let (_, clock) = clock_at(0);
    let err =
        Supervisor::start("echo", load(&rt, "echo", Limits::default()), "{}", Box::new(MemoryState::new()), clock)
            .err()
            .expect("echo needs its filters");
    assert!(matches!(&err, PluginError::Init { message, .. } if message.contains("requests")), "{err}");
}

#[test]
fn clock_publishes_on_its_timer() {
    let rt = runtime();
    let (now, clock) = clock_at(5_250);
    let config = r#"{"under": "0x0c000000000000000000000000000000/16", "period_ms": 1000, "ttl_ms": 3000}"#;
    let mut c =
        Supervisor::start("clock", load(&rt, "clock", Limits::default()), config, Box::new(MemoryState::new()), clock)
            .unwrap();
    assert_eq!(c.next_timer(), Some(5_250));
    c.fire_timers(5_250);
    let tick = Chunk::new(Name::new(0x0c00_u128 << 112 | 5_250), 8_250, 5_250u64.to_be_bytes().to_vec()).unwrap();
    assert_eq!(c.take_effects(), vec![Effect::Publish(tick)]);
    // The next tick is aligned to the period.
    assert_eq!(c.next_timer(), Some(6_000));
    now.store(6_000, Ordering::SeqCst);
    c.fire_timers(5_999);
    assert!(c.take_effects().is_empty());
    c.fire_timers(6_000);
    assert_eq!(c.take_effects().len(), 1);
}

fn hostile(rt: &Runtime, limits: Limits, config: &str, state: Box<dyn StateStore>) -> Supervisor {
    let (_, clock) = clock_at(0);
    hostile_at(rt, limits, config, state, clock)
}

fn hostile_at(rt: &Runtime, limits: Limits, config: &str, state: Box<dyn StateStore>, clock: Clock) -> Supervisor {
    Supervisor::start("hostile", load(rt, "hostile", limits), config, state, clock).unwrap()
}

#[test]
fn an_infinite_loop_is_interrupted_at_its_deadline_and_the_plugin_comes_back() {
    let rt = runtime();
    let limits = Limits { deadline_ms: 50, ..Limits::default() };
    let mut p = hostile(&rt, limits, "{}", Box::new(MemoryState::new()));
    let started = Instant::now();
    let err = command(&mut p, "spin").unwrap_err();
    println!("spin interrupted after {:?} (deadline 50 ms)", started.elapsed());
    assert_eq!(fault_kind(err), FaultKind::Deadline);
    assert_eq!(p.stats().restarts, 1);
    assert_eq!(ok(&mut p, "hello"), "hello");
}

#[test]
fn an_allocation_bomb_hits_the_memory_limit() {
    let rt = runtime();
    // A generous deadline: on a loaded machine the bomb must still meet the memory limit first.
    let limits = Limits { memory_bytes: 16 << 20, deadline_ms: 2_000, ..Limits::default() };
    let mut p = hostile(&rt, limits, "{}", Box::new(MemoryState::new()));
    assert_eq!(fault_kind(command(&mut p, "bomb").unwrap_err()), FaultKind::Memory);
    assert_eq!(ok(&mut p, "hello"), "hello");
}

#[test]
fn a_trapping_plugin_restarts_with_its_state_and_without_the_failed_callbacks_writes() {
    let rt = runtime();
    let mut p = hostile(&rt, Limits::default(), "{}", Box::new(MemoryState::new()));
    for n in 1..=3 {
        assert_eq!(ok(&mut p, "incr"), n.to_string());
    }
    assert_eq!(fault_kind(command(&mut p, "trap").unwrap_err()), FaultKind::Trap);
    assert_eq!(ok(&mut p, "get"), "3");
    assert_eq!(fault_kind(command(&mut p, "incr-trap").unwrap_err()), FaultKind::Trap);
    assert_eq!(ok(&mut p, "get"), "3", "a trapped callback's writes are dropped");
    assert_eq!(ok(&mut p, "boots"), "3");
    let stats = p.stats();
    assert_eq!((stats.failures, stats.restarts, stats.quarantined), (2, 2, false));
}

#[test]
fn a_restart_keeps_the_subscriptions_the_new_instance_asks_for_again() {
    let rt = runtime();
    let config = r#"{"control": "0x0a000000000000000000000000000000/16"}"#;
    let mut p = hostile(&rt, Limits::default(), config, Box::new(MemoryState::new()));
    let control = filter("0x0a000000000000000000000000000000/16");
    assert_eq!(p.take_effects(), vec![Effect::Subscribe(control)]);
    p.on_chunks(&[Chunk::new(Name::new(0x0a00 << 112), 1, &b"trap"[..]).unwrap()]);
    assert_eq!(p.stats().restarts, 1);
    assert_eq!(p.stats().chunks_poisoned, 1);
    assert_eq!(p.take_effects(), vec![], "the subscription stayed open across the restart");
    assert_eq!(p.subscriptions().copied().collect::<Vec<_>>(), vec![control]);
}

#[test]
fn a_plugin_that_keeps_failing_is_quarantined() {
    let rt = runtime();
    let (now, clock) = clock_at(0);
    // A generous deadline, so a restart on a loaded machine never fails for slowness: only
    // the traps count here.
    let mut p = hostile_at(
        &rt,
        Limits { deadline_ms: 2_000, ..Limits::default() },
        r#"{"control": "0x0a000000000000000000000000000000/16"}"#,
        Box::new(MemoryState::new()),
        clock,
    );
    p.take_effects();
    // Failures spread wider than the window never add up to a quarantine.
    for i in 0..6 {
        now.store(i * 61_000, Ordering::SeqCst);
        command(&mut p, "trap").unwrap_err();
    }
    assert!(!p.is_quarantined());
    for _ in 0..4 {
        command(&mut p, "trap").unwrap_err();
    }
    assert!(p.is_quarantined());
    assert_eq!(p.stats().failures, 10);
    assert!(matches!(command(&mut p, "hello"), Err(PluginError::Quarantined(_))));
    // Quarantined means subscribed to nothing.
    assert!(p.take_effects().ends_with(&[Effect::Unsubscribe(filter("0x0a000000000000000000000000000000/16"))]));
    assert_eq!(p.subscriptions().count(), 0);
}

#[test]
fn a_plugin_that_cannot_start_again_is_quarantined_at_once() {
    let rt = runtime();
    let mut p = hostile(&rt, Limits::default(), r#"{"fail_init": true}"#, Box::new(MemoryState::new()));
    command(&mut p, "trap").unwrap_err();
    assert!(p.is_quarantined());
    assert_eq!(p.stats().failures, 5);
}

#[test]
fn state_lives_in_the_fjall_database_namespaced_per_plugin() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    {
        let store = FjallStore::open(dir.path(), canopy::store::UNLIMITED).unwrap();
        let mut a = hostile(&rt, Limits::default(), "{}", Box::new(store.plugin_state("a").unwrap()));
        let mut b = hostile(&rt, Limits::default(), "{}", Box::new(store.plugin_state("b").unwrap()));
        ok(&mut a, "incr");
        ok(&mut a, "incr");
        ok(&mut b, "incr");
    }
    let store = FjallStore::open(dir.path(), canopy::store::UNLIMITED).unwrap();
    let mut a = hostile(&rt, Limits::default(), "{}", Box::new(store.plugin_state("a").unwrap()));
    let mut b = hostile(&rt, Limits::default(), "{}", Box::new(store.plugin_state("b").unwrap()));
    assert_eq!((ok(&mut a, "get"), ok(&mut b, "get")), ("2".into(), "1".into()));
    assert_eq!(ok(&mut a, "boots"), "2");
}

#[test]
fn compiled_plugins_are_cached_on_disk_and_a_broken_entry_is_recompiled() {
    let cache = tempfile::tempdir().unwrap();
    let options = RuntimeOptions { cache_dir: Some(cache.path().to_owned()), fuel: false };
    let entries = || std::fs::read_dir(cache.path()).unwrap().map(|e| e.unwrap().path()).collect::<Vec<_>>();

    Runtime::new(options.clone()).unwrap().load_file(&wasm("echo"), Limits::default(), &[]).unwrap();
    let files = entries();
    assert_eq!(files.len(), 1);
    let name = files[0].file_name().unwrap().to_string_lossy().into_owned();
    assert!(name.starts_with("wasmtime-48.") && name.ends_with(".cwasm"), "{name}");
    let written = std::fs::metadata(&files[0]).unwrap().modified().unwrap();

    // A second runtime loads the cached code and leaves the entry alone.
    Runtime::new(options.clone()).unwrap().load_file(&wasm("echo"), Limits::default(), &[]).unwrap();
    assert_eq!(std::fs::metadata(&files[0]).unwrap().modified().unwrap(), written);

    // A corrupt entry is ignored and replaced.
    std::fs::write(&files[0], b"not a compiled component").unwrap();
    let rt = Runtime::new(options).unwrap();
    let echo = rt.load_file(&wasm("echo"), Limits::default(), &[]).unwrap();
    let (_, clock) = clock_at(0);
    let config =
        r#"{"requests": "0x01000000000000000000000000000000/8", "replies": "0x02000000000000000000000000000000/8"}"#;
    Supervisor::start("echo", echo, config, Box::new(MemoryState::new()), clock).unwrap();
    assert!(std::fs::read(&files[0]).unwrap().len() > 1000);
}

#[test]
fn fuel_needs_a_metering_runtime_and_then_stops_a_loop() {
    let limits = Limits { fuel: Some(1_000_000), deadline_ms: 10_000, ..Limits::default() };
    let err = runtime().load_file(&wasm("hostile"), limits, &[]).err().expect("no fuel in this runtime");
    assert!(matches!(err, PluginError::Unsupported(_)), "{err}");

    let rt = Runtime::new(RuntimeOptions { fuel: true, ..RuntimeOptions::default() }).unwrap();
    let mut p = hostile(&rt, limits, "{}", Box::new(MemoryState::new()));
    assert_eq!(fault_kind(command(&mut p, "spin").unwrap_err()), FaultKind::Fuel);
    assert_eq!(ok(&mut p, "hello"), "hello");
}

#[test]
fn a_file_that_is_not_a_plugin_is_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("junk.wasm");
    std::fs::write(&path, b"\0asm junk").unwrap();
    let err = runtime().load_file(&path, Limits::default(), &[]).err().unwrap();
    assert!(matches!(err, PluginError::Load { .. }), "{err}");
    let err = runtime().load_file(&dir.path().join("missing.wasm"), Limits::default(), &[]).err().unwrap();
    assert!(matches!(err, PluginError::Read { .. }), "{err}");
}

const CONTROL: &str = r#"{"control": "0x0a000000000000000000000000000000/16"}"#;

fn control(seq: u128, command: &str) -> Chunk {
    Chunk::new(Name::new(0x0a00 << 112 | seq), 9_000, command.as_bytes().to_vec()).unwrap()
}

#[test]
fn a_poison_chunk_in_a_batch_loses_only_itself_and_becomes_a_dead_letter() {
    let rt = runtime();
    let mut p = hostile(&rt, Limits::default(), CONTROL, Box::new(MemoryState::new()));
    let dead = filter("0xdead0000000000000000000000000000/16");
    p.set_dead_letter(Some(dead)).unwrap();
    p.take_effects();
    let poison = control(3, "trap");
    p.on_chunks(&[control(1, "incr"), control(2, "incr"), poison.clone(), control(4, "incr")]);
    assert_eq!(ok(&mut p, "get"), "3", "every chunk but the poison one was taken");
    let stats = p.stats();
    assert_eq!(stats.chunks_poisoned, 1);
    assert_eq!(stats.batches_isolated, 1);
    assert_eq!(stats.chunks_dropped, 0);
    assert_eq!(stats.failures, 1, "a poison chunk costs one failure, batched or not");
    assert_eq!(stats.restarts, 2, "once for the batch, once for the poison chunk alone");
    assert!(p.last_fault().unwrap().message.contains(&poison.name().to_string()), "{:?}", p.last_fault());

    let letter = canopy::plugin::dead_letter(dead, &poison);
    assert!(dead.matches(letter.name()));
    assert_eq!(&letter.data()[..16], &poison.name().to_bytes());
    assert_eq!(&letter.data()[16..], b"trap");
    assert_eq!(letter.expiry(), poison.expiry());
    assert_eq!(p.take_effects(), vec![Effect::Publish(letter.clone())]);
    assert_eq!(canopy::plugin::dead_letter(dead, &poison), letter, "the same poison makes the same dead letter");

    // The same chunk alone costs the same.
    p.on_chunks(std::slice::from_ref(&poison));
    let stats = p.stats();
    assert_eq!((stats.chunks_poisoned, stats.batches_isolated, stats.failures), (2, 1, 2));
    assert_eq!(p.take_effects(), vec![Effect::Publish(letter)]);
}

#[test]
fn a_batch_with_several_poison_chunks_counts_each_once_and_quarantine_drops_the_rest() {
    let rt = runtime();
    let limits = Limits { max_failures: 2, ..Limits::default() };
    let mut p = hostile(&rt, limits, CONTROL, Box::new(MemoryState::new()));
    p.take_effects();
    p.on_chunks(&[control(1, "incr"), control(2, "trap"), control(3, "incr"), control(4, "trap"), control(5, "incr")]);
    let stats = p.stats();
    assert!(stats.quarantined);
    assert_eq!((stats.failures, stats.chunks_poisoned, stats.chunks_dropped), (2, 2, 1));
}

#[test]
fn dead_letter_filters_longer_than_64_bits_are_refused() {
    let rt = runtime();
    let mut p = hostile(&rt, Limits::default(), "{}", Box::new(MemoryState::new()));
    let err = p.set_dead_letter(Some(filter("0xdead0000000000000000000000000000/72"))).unwrap_err();
    assert!(err.to_string().contains("/64"), "{err}");
}

#[test]
fn with_tool_limits_a_batch_is_isolated_and_the_run_ends_at_the_poison_chunk() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    // What `canopy plugin run` uses: the first failure ends the run.
    let limits = Limits { max_failures: 1, ..Limits::default() };
    let poison = control(3, "trap");
    {
        let store = FjallStore::open(dir.path(), canopy::store::UNLIMITED).unwrap();
        let mut p = hostile(&rt, limits, CONTROL, Box::new(store.plugin_state("tool").unwrap()));
        p.on_chunks(&[control(1, "incr"), control(2, "incr"), poison.clone(), control(4, "incr")]);
        assert!(p.is_quarantined());
        let fault = p.last_fault().unwrap();
        assert_eq!(fault.kind, FaultKind::Trap);
        assert!(fault.message.contains(&format!("on chunk {}", poison.name())), "{}", fault.message);
        assert_eq!((p.stats().chunks_poisoned, p.stats().chunks_dropped), (1, 1));
    }
    let store = FjallStore::open(dir.path(), canopy::store::UNLIMITED).unwrap();
    let mut p = hostile(&rt, Limits::default(), "{}", Box::new(store.plugin_state("tool").unwrap()));
    assert_eq!(ok(&mut p, "get"), "2", "the chunks before the poison one were taken");
}
