//! `emo bench`: latency percentiles and throughput of the fast engine, interleaved with ONNX
//! Runtime (a Python child process) and the burn model in the same run.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use burn::tensor::{Tensor, TensorData};
use emo_spec::Variant;

pub struct Args {
    pub variant: Variant,
    pub batch: usize,
    pub size: (usize, usize),
    pub runs: usize,
    pub rounds: usize,
    pub compare_onnx: Option<PathBuf>,
    pub compare_burn: bool,
    pub profile: bool,
}

const ORT_SERVER: &str = include_str!("../../../scripts/ort_server.py");

/// A Python helper in a child process: started with a script and arguments, it prints one
/// line when ready, then answers each command line with one line, and stops at `quit`.
struct Server {
    child: std::process::Child,
    out: BufReader<std::process::ChildStdout>,
}

impl Server {
    /// Start `script` (its text, written to a temporary file) with `args`; returns the server
    /// and its first line, or an error saying what to install (`hint`).
    fn start(name: &str, script: &str, args: &[std::ffi::OsString], hint: &str) -> Result<(Self, String)> {
        let path = std::env::temp_dir().join(format!("emo_{name}_{}.py", std::process::id()));
        std::fs::write(&path, script)?;
        let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
        let mut child = Command::new(&python)
            .arg(&path)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {python} for {name}"))?;
        let mut out = BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        out.read_line(&mut line)?;
        if !line.starts_with("ready") {
            let _ = child.wait();
            bail!("{name} did not start (PYTHON={python}): {hint}");
        }
        Ok((Server { child, out }, line.trim().to_string()))
    }

    /// Send one command, read one line back.
    fn ask(&mut self, cmd: &str) -> Result<String> {
        writeln!(self.child.stdin.as_mut().expect("stdin"), "{cmd}")?;
        let mut line = String::new();
        self.out.read_line(&mut line)?;
        Ok(line.trim().to_string())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(stdin) = self.child.stdin.as_mut() {
            let _ = writeln!(stdin, "quit");
        }
        let _ = self.child.wait();
    }
}

/// ONNX Runtime (scripts/ort_server.py): `run K` answers K latencies in ms.
struct Ort(Server);

impl Ort {
    fn start(model: &std::path::Path, threads: usize) -> Result<(Self, String)> {
        ensure!(model.exists(), "{} does not exist", model.display());
        let args = [model.as_os_str().to_owned(), threads.to_string().into()];
        let hint = "is `onnxruntime` installed? run scripts/bench.sh, or `pip install onnxruntime numpy`";
        let (server, ready) = Server::start("ort_server", ORT_SERVER, &args, hint)?;
        let shape = ready.strip_prefix("ready ").unwrap_or_default().to_string();
        Ok((Ort(server), shape))
    }

    fn run(&mut self, k: usize) -> Result<Vec<f64>> {
        self.0
            .ask(&format!("run {k}"))?
            .split_whitespace()
            .map(|t| t.parse::<f64>().context("bad ORT timing"))
            .collect()
    }
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn report(name: &str, times: &mut [f64], batch: usize) -> f64 {
    times.sort_by(f64::total_cmp);
    let med = pct(times, 0.5);
    println!(
        "{name:<14} {med:>9.2} {:>8.2} {:>8.2} {:>8.2} {:>9.1}",
        pct(times, 0.1),
        pct(times, 0.9),
        times[0],
        batch as f64 * 1e3 / med
    );
    med
}

/// ONNX Runtime on `a.compare_onnx` (when given), whose input must be the bench's.
fn start_ort(a: &Args, threads: usize) -> Result<Option<Ort>> {
    let Some(p) = &a.compare_onnx else { return Ok(None) };
    let (o, shape) = Ort::start(p, threads)?;
    let want = format!("{}x3x{}x{}", a.batch, a.size.0, a.size.1);
    ensure!(shape == want, "{} takes input {shape}, but the bench is {want} (use --batch/--size)", p.display());
    Ok(Some(o))
}

/// The bench's NCHW input: a fixed pattern in [-1, 1).
fn bench_input(a: &Args) -> Vec<f32> {
    (0..a.batch * 3 * a.size.0 * a.size.1).map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0).collect()
}

/// Latencies (ms) of each engine, interleaved round by round.
struct Timings {
    ours: Vec<f64>,
    ort: Vec<f64>,
    burn: Vec<f64>,
}

impl Timings {
    /// Print the table rows; the medians of ours, ORT's and burn's (those that ran).
    fn report(&mut self, batch: usize) -> (f64, Option<f64>, Option<f64>) {
        println!("{:<14} {:>9} {:>8} {:>8} {:>8} {:>9}", "engine", "median ms", "p10", "p90", "min", "img/s");
        let med = report("emo (fast)", &mut self.ours, batch);
        let ort = (!self.ort.is_empty()).then(|| report("onnxruntime", &mut self.ort, batch));
        let burn = (!self.burn.is_empty()).then(|| report("burn flex", &mut self.burn, batch));
        (med, ort, burn)
    }
}

/// `ratio_vs_burn` / `ratio_vs_onnx`: our median over theirs.
fn ratios(med: f64, ort: Option<f64>, burn: Option<f64>) {
    if let Some(b) = burn {
        println!("ratio_vs_burn: {:.3}", med / b);
    }
    if let Some(o) = ort {
        println!("ratio_vs_onnx: {:.3}", med / o);
    }
}

/// `a.rounds` rounds of: `a.runs` timed runs of `ours`, then `a.runs` of ONNX Runtime and
/// `ceil(a.runs / 2)` of burn (`burn` times itself, after making its input), each handed the
/// cores cleanly: our idle workers stop spinning first, ORT's threads settle after.
fn interleave(
    a: &Args,
    mut ours: impl FnMut() -> Result<()>,
    ort: &mut Option<Ort>,
    mut burn: Option<&mut dyn FnMut() -> Result<f64>>,
) -> Result<Timings> {
    let mut t = Timings { ours: Vec::new(), ort: Vec::new(), burn: Vec::new() };
    for _ in 0..a.rounds {
        for _ in 0..a.runs {
            let start = Instant::now();
            ours()?;
            t.ours.push(start.elapsed().as_secs_f64() * 1e3);
        }
        if let Some(o) = ort.as_mut() {
            emo_kernels::pool::release();
            t.ort.extend(o.run(a.runs)?);
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        if let Some(b) = burn.as_mut() {
            emo_kernels::pool::release();
            for _ in 0..a.runs.div_ceil(2) {
                t.burn.push(b()?);
            }
        }
    }
    Ok(t)
}

pub fn run(a: &Args) -> Result<()> {
    ensure!(a.batch > 0 && a.runs > 0 && a.rounds > 0, "batch, runs and rounds must be > 0");
    let (h, w) = a.size;
    let cfg = a.variant.config();
    let sd = emo_weights::synthetic(&cfg, 0);
    let mut engine = emo_infer::Engine::from_state_dict(&cfg, &sd)?;
    let x = bench_input(a);
    let threads = emo_kernels::pool::num_threads();
    let mut ort = start_ort(a, threads)?;
    let device = crate::backend::device()?;
    let burn_model = if a.compare_burn { Some(emo_model::Emo::from_state_dict(&cfg, &sd, &device)?) } else { None };
    let burn_x = || Tensor::<4>::from_data(TensorData::new(x.clone(), [a.batch, 3, h, w]), &device);

    println!(
        "emo bench: {} batch {} {h}x{w}, {threads} threads, SIMD {:?}, {} rounds x {} runs (interleaved)",
        a.variant.paper_name(),
        a.batch,
        emo_kernels::isa::level(),
        a.rounds,
        a.runs
    );
    // warm-up
    let warm = if a.batch == 1 { 5 } else { 2 };
    for _ in 0..warm {
        engine.run(&x, a.batch, h, w)?;
    }
    if let Some(o) = ort.as_mut() {
        o.run(warm)?;
    }
    if let Some(m) = &burn_model {
        m.forward(burn_x())?.into_data();
    }
    let mut timed_burn = || -> Result<f64> {
        let (m, xt) = (burn_model.as_ref().expect("asked for"), burn_x());
        let t = Instant::now();
        std::hint::black_box(m.forward(xt)?.into_data());
        Ok(t.elapsed().as_secs_f64() * 1e3)
    };
    let mut t = interleave(
        a,
        || {
            std::hint::black_box(engine.run(&x, a.batch, h, w)?);
            Ok(())
        },
        &mut ort,
        a.compare_burn.then_some(&mut timed_burn as &mut dyn FnMut() -> Result<f64>),
    )?;
    let (med, ort_med, burn_med) = t.report(a.batch);
    if a.profile {
        engine.set_profiling(true);
        let n = a.runs * a.rounds;
        for _ in 0..n {
            engine.run(&x, a.batch, h, w)?;
        }
        let prof = engine.profile();
        let total: f64 = prof.iter().map(|(_, t)| t).sum();
        println!("\nper-step time (mean of {n} runs; {:.2} ms in all):", total * 1e3 / n as f64);
        for (name, t) in prof {
            println!("  {name:<10} {:>8.3} ms {:>5.1}%", t * 1e3 / n as f64, 100.0 * t / total);
        }
    }
    ratios(med, ort_med, burn_med);
    Ok(())
}

/// `emo bench --task`: a whole detector / segmenter (backbone, neck, heads; no post-processing)
/// on the fast engine, interleaved with ONNX Runtime (an export of the mmdet / mmseg model by
/// `scripts/mm_dense_reference.py --onnx`) and / or the burn model when asked.
pub fn run_dense(a: &Args, task: emo_spec::Task) -> Result<()> {
    ensure!(a.batch > 0 && a.runs > 0 && a.rounds > 0, "batch, runs and rounds must be > 0");
    ensure!(!a.profile, "--profile times the classifier's blocks (no --task)");
    let (h, w) = a.size;
    let cfg = emo_spec::DenseConfig::new(task, a.variant, task.paper_classes(), a.size);
    let device = burn::tensor::Device::flex();
    let model = emo_dense::DenseModel::new(&cfg, None, &device)?;
    let mut engine = emo_infer::dense::DenseEngine::from_state_dict(&cfg, &model.state_dict())?;
    let x = bench_input(a);
    let burn_x = || Tensor::<4>::from_data(TensorData::new(x.clone(), [a.batch, 3, h, w]), &device);
    let burn_run = || -> Result<()> {
        match model.forward(burn_x(), false)? {
            emo_dense::DenseOutput::Det { cls, reg } => {
                std::hint::black_box((cls.into_data(), reg.into_data()));
            }
            emo_dense::DenseOutput::Seg { logits, .. } => {
                std::hint::black_box(logits.into_data());
            }
        }
        Ok(())
    };
    let threads = emo_kernels::pool::num_threads();
    let mut ort = start_ort(a, threads)?;
    println!(
        "emo bench: {task} on {} ({} classes) batch {} {h}x{w}, {} threads, SIMD {:?}, {} rounds x {} runs (interleaved)",
        a.variant.paper_name(),
        cfg.num_classes,
        a.batch,
        threads,
        emo_kernels::isa::level(),
        a.rounds,
        a.runs
    );
    for _ in 0..2 {
        engine.run(&x, a.batch, h, w)?;
    }
    if let Some(o) = ort.as_mut() {
        o.run(2)?;
    }
    if a.compare_burn {
        burn_run()?;
    }
    let mut timed_burn = || -> Result<f64> {
        let t = Instant::now();
        burn_run()?;
        Ok(t.elapsed().as_secs_f64() * 1e3)
    };
    let mut t = interleave(
        a,
        || {
            std::hint::black_box(engine.run(&x, a.batch, h, w)?);
            Ok(())
        },
        &mut ort,
        a.compare_burn.then_some(&mut timed_burn as &mut dyn FnMut() -> Result<f64>),
    )?;
    let (med, ort_med, burn_med) = t.report(a.batch);
    ratios(med, ort_med, burn_med);
    Ok(())
}

/// `emo bench-train`: training steps per second of the burn model (flex, data-parallel over
/// `workers` threads), interleaved in the same run with PyTorch training the same
/// architecture (`scripts/torch_train_bench.py`, checked against the official outputs first).
pub struct TrainArgs {
    pub variant: Variant,
    pub batch: usize,
    pub size: usize,
    pub workers: usize,
    pub steps: usize,
    pub rounds: usize,
    pub compare_torch: bool,
    /// burn backends to time (interleaved), the first one reported as `ratio_vs_torch`.
    pub backends: Vec<crate::backend::Backend>,
}

const TORCH_BENCH: &str = include_str!("../../../scripts/torch_train_bench.py");

/// The PyTorch side (scripts/torch_train_bench.py): `steps N` answers N step times.
struct Torch(Server);

impl Torch {
    fn start(a: &TrainArgs) -> Result<Self> {
        let mut args: Vec<std::ffi::OsString> = [
            "--variant".into(),
            a.variant.to_string(),
            "--batch".into(),
            a.batch.to_string(),
            "--size".into(),
            a.size.to_string(),
            "--threads".into(),
            a.workers.to_string(),
        ]
        .into_iter()
        .map(Into::into)
        .collect();
        // Check the PyTorch model against the official outputs when the fixtures are here.
        let here = env!("CARGO_MANIFEST_DIR");
        let fixtures = [format!("{here}/../../../shared/fixtures/emo"), format!("{here}/../../fixtures/emo")]
            .into_iter()
            .map(PathBuf::from)
            .find(|d| d.join(format!("{}.safetensors", a.variant.to_string().replace('-', "_"))).exists());
        if let Some(d) = &fixtures {
            args.extend(["--check".into(), d.as_os_str().to_owned()]);
        }
        let hint = "needs `torch`, and `safetensors` for the parity check";
        let (server, _) = Server::start("torch_train_bench", TORCH_BENCH, &args, hint)?;
        if fixtures.is_none() {
            eprintln!("note: no official fixture for {} here; the PyTorch model was not parity-checked", a.variant);
        }
        Ok(Torch(server))
    }

    fn steps(&mut self, n: usize) -> Result<Vec<f64>> {
        let line = self.0.ask(&format!("steps {n}"))?;
        let Some(times) = line.strip_prefix("ok ") else { bail!("PyTorch bench: unexpected `{line}`") };
        times.split(',').map(|t| t.parse::<f64>().context("bad PyTorch timing")).collect()
    }
}

pub fn train(a: &TrainArgs) -> Result<()> {
    ensure!(
        a.batch > 0 && a.steps > 0 && a.rounds > 0 && a.workers > 0,
        "batch, steps, rounds and workers must be > 0"
    );
    // Random 28x28 grey images (the Fashion-MNIST pipeline brings them to `size`).
    let mut s = 0x2545_F491_4F6C_DD1Du64;
    let mut next = || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    let images: Vec<u8> = (0..a.batch * 784).map(|_| next() as u8).collect();
    let labels: Vec<u8> = (0..a.batch).map(|_| (next() % 10) as u8).collect();
    let split = emo_train::data::Split { images, labels, channels: 1, h: 28, w: 28, classes: 10 };
    let mut cfg = emo_train::TrainConfig::fashion_mnist(a.variant);
    (cfg.batch, cfg.workers, cfg.data) = (a.batch, a.workers, "synthetic".into());
    cfg.pipeline.size = a.size;
    // One trainer per backend, each in its own scratch folder; flex with `workers` replicas,
    // LibTorch with its default (one: it spreads each op over the cores itself).
    let mut trainers = Vec::new();
    for &b in &a.backends {
        let mut cfg = cfg.clone();
        cfg.workers = if b == crate::backend::Backend::Flex { a.workers } else { b.default_workers(a.batch) };
        let dir = std::env::temp_dir().join(format!("emo-bench-train-{}-{b}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut t = emo_train::Trainer::new(cfg, &dir, split.clone(), split.clone(), b.device()?.autodiff())?;
        t.verbose = false;
        t.time_steps(1)?;
        trainers.push((b, t, dir, Vec::new()));
    }
    let mut torch = if a.compare_torch { Some(Torch::start(a)?) } else { None };
    let names: Vec<String> =
        trainers.iter().map(|(b, t, ..)| format!("burn {b} ({} data-parallel workers)", t.cfg.workers)).collect();
    println!(
        "{} training step (forward + backward + AdamW), batch {} at {s}x{s}: {}{}, interleaved",
        a.variant,
        a.batch,
        names.join(", "),
        if torch.is_some() { format!(", PyTorch on {} threads", a.workers) } else { String::new() },
        s = a.size
    );
    let mut theirs = Vec::new();
    for _ in 0..a.rounds {
        for (_, t, _, times) in trainers.iter_mut() {
            times.extend(t.time_steps(a.steps)?);
        }
        if let Some(th) = torch.as_mut() {
            theirs.extend(th.steps(a.steps)?);
        }
    }
    let report = |name: &str, v: &mut Vec<f64>| -> f64 {
        v.sort_by(f64::total_cmp);
        let med = v[v.len() / 2];
        println!(
            "{name:<10} median {:>8.1} ms/step  min {:>8.1} ms  {:>7.1} img/s  ({} steps)",
            med * 1e3,
            v[0] * 1e3,
            a.batch as f64 / med,
            v.len()
        );
        med
    };
    let mut meds = Vec::new();
    for (b, t, dir, mut times) in trainers {
        drop(t);
        let _ = std::fs::remove_dir_all(&dir);
        meds.push((b, report(&format!("emo-{b}"), &mut times)));
    }
    if !theirs.is_empty() {
        let p = report("pytorch", &mut theirs);
        for (b, m) in &meds {
            // The first backend keeps the plain name that scripts read.
            let key = if *b == meds[0].0 { "ratio_vs_torch".to_string() } else { format!("ratio_vs_torch_{b}") };
            println!("{key}: {:.3}", m / p);
        }
    }
    Ok(())
}
