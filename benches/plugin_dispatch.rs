//! Dispatching chunks into a plugin: the `sink` plugin (`plugins/sink`, which only counts what
//! it is given) as a Wasm component and as a native library, side by side, one chunk per call
//! and in batches of 64; and starting a Wasm plugin from the precompiled cache.
//!
//! Needs `scripts/build-plugins.sh --release` (the Wasm build and the release native build).

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use canopy::plugin::{Limits, MemoryState, NativeTemplate, Runtime, RuntimeOptions, Supervisor, Template};
use canopy::{Chunk, Name};
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};

#[path = "../framework/tests/support/plugin_artifacts.rs"]
mod plugin_artifacts;

fn start(template: Arc<dyn Template>) -> Supervisor {
    Supervisor::start("sink", template, "{}", Box::new(MemoryState::new()), Arc::new(|| 0)).unwrap()
}

/// Chunks of 100 bytes, a typical message.
fn chunks(n: usize) -> Vec<Chunk> {
    (0..n).map(|i| Chunk::new(Name::new(0x0a << 120 | i as u128), u64::MAX, vec![0x5a; 100]).unwrap()).collect()
}

fn dispatch(c: &mut Criterion) {
    let runtime = Runtime::new(RuntimeOptions::default()).unwrap();
    let wasm: Arc<dyn Template> = runtime.load_file(&plugin_artifacts::wasm("sink"), Limits::default(), &[]).unwrap();
    let native: Arc<dyn Template> = NativeTemplate::load(&plugin_artifacts::native("sink"), Limits::default()).unwrap();
    let one = chunks(1);
    let batch = chunks(64);

    let mut group = c.benchmark_group("plugin_dispatch");
    group.measurement_time(Duration::from_secs(3));
    for (kind, template) in [("wasm", &wasm), ("native", &native)] {
        let mut plugin = start(template.clone());
        group.throughput(Throughput::Elements(1));
        group.bench_function(format!("{kind}/1"), |b| b.iter(|| plugin.on_chunks(black_box(&one))));
        group.throughput(Throughput::Elements(64));
        group.bench_function(format!("{kind}/64"), |b| b.iter(|| plugin.on_chunks(black_box(&batch))));
        // The plugin saw every chunk: the calls were real.
        let count = plugin.command(&["count".into()]).unwrap().unwrap();
        assert!(count.split(' ').next().unwrap().parse::<u64>().unwrap() > 0, "{count}");
        assert_eq!(plugin.stats().failures, 0);
    }
    group.finish();

    let mut group = c.benchmark_group("plugin_start");
    group.measurement_time(Duration::from_secs(3));
    // From the pre-instantiated template: what a restart after a trap costs.
    group.bench_function("wasm/from_template", |b| b.iter(|| start(wasm.clone())));
    // From the on-disk cache in a fresh runtime: read + map the compiled code, link,
    // pre-instantiate, instantiate and run `init`.
    let cache = tempfile::tempdir().unwrap();
    let options = RuntimeOptions { cache_dir: Some(cache.path().to_owned()), fuel: false };
    let cached = Runtime::new(options).unwrap();
    cached.load_file(&plugin_artifacts::wasm("sink"), Limits::default(), &[]).unwrap();
    group.bench_function("wasm/from_disk_cache", |b| {
        b.iter_batched(
            || (),
            |()| start(cached.load_file(&plugin_artifacts::wasm("sink"), Limits::default(), &[]).unwrap()),
            BatchSize::PerIteration,
        )
    });
    group.bench_function("wasm/compile_uncached", |b| {
        b.iter(|| start(runtime.load_file(&plugin_artifacts::wasm("sink"), Limits::default(), &[]).unwrap()))
    });
    group.bench_function("native/from_library", |b| b.iter(|| start(native.clone())));
    group.finish();
}

criterion_group!(benches, dispatch);
criterion_main!(benches);
