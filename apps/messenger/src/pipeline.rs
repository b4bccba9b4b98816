//! `pipeline create|list|show|act`: pipelines run their model here, in the UI process, on
//! plaintext (`docs/pipelines.md`). Secure keeps the group, its messages and the sealed state;
//! it never runs a model.

use std::collections::BTreeSet;

use anyhow::{Context as _, bail};
use canopy_msg_pipeline::{Limits, Message, Model, ModelId, Rendering, Runtime, Signer, State};
use canopy_msg_secure::proto::{PipelineLog, Reply, Request};
use sha2::{Digest, Sha256};

use crate::home::Home;
use crate::ui::{Secure, clean, unexpected};

use canopy_msg_core::engine::hex;

/// This process's model runtime: one engine, and each model compiled once however often a
/// long-running UI (the TUI) shows its pipeline.
fn runtime() -> anyhow::Result<&'static Runtime> {
    static RUNTIME: std::sync::OnceLock<Runtime> = std::sync::OnceLock::new();
    if let Some(rt) = RUNTIME.get() {
        return Ok(rt);
    }
    let rt = Runtime::new()?;
    Ok(RUNTIME.get_or_init(|| rt))
}

/// What the UI keeps sealed in Secure between runs: the model's state and what was noticed
/// on the way (so a later run from the saved state still reports it).
#[derive(serde::Serialize, serde::Deserialize, Default)]
struct Kept {
    state: Vec<u8>,
    refused: Vec<String>,
    diverged: Vec<String>,
}

/// A pipeline with its model run over every step this device holds.
pub struct Run {
    /// What Secure holds.
    pub log: PipelineLog,
    /// The model.
    pub model: Model,
    /// The state after every step.
    pub state: State,
    /// Steps the model refused (each with its reason); they changed nothing.
    pub refused: Vec<String>,
    /// Steps whose sender's state before them differs from this device's: a divergence.
    pub diverged: Vec<String>,
}

/// The digest of the first steps' ids, which a saved state is only good for.
fn digest(log: &PipelineLog, count: usize) -> String {
    let mut h = Sha256::new();
    for s in &log.steps[..count] {
        h.update(s.id.as_bytes());
        h.update(b"\n");
    }
    hex(&h.finalize())
}

/// What Secure says signing a payload means, before the user has approved it: what a UI
/// that cannot prompt on a terminal (the TUI) shows and asks about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Review {
    /// The key the model asks to sign with.
    pub key: String,
    /// Secure's summary of what is signed, computed from the payload itself (for a PSBT: the
    /// input, each output and the fee).
    pub summary: Vec<String>,
    /// Secure's digest of what it reviewed: approving it approves exactly that payload.
    pub digest: String,
}

/// How a signing the model asks for is approved.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Approval {
    /// Show Secure's summary and ask on the terminal; refused without one.
    #[default]
    Prompt,
    /// Show the summary and approve it (`--yes`).
    Yes,
    /// Stop at the first signing and hand back Secure's [`Review`], for a UI that shows it
    /// and asks; the action is then taken again with [`Approval::Approved`].
    Review,
    /// Sign only a payload Secure reviews to this digest: what the user approved. A model
    /// that asks for anything else the second time gets nothing signed.
    Approved(String),
}

/// The model's `sign`: Secure reviews the payload and says what signing it means; the user
/// approves it ([`Approval`]); Secure signs exactly what was approved.
pub struct SecureSigner {
    /// The device.
    pub home: Home,
    /// How signing is approved.
    pub approval: Approval,
    /// Where [`Approval::Review`] leaves Secure's review.
    pub reviewed: std::sync::Arc<std::sync::Mutex<Option<Review>>>,
}

impl SecureSigner {
    fn ask(&mut self, key: &str, kind: &str, payload: &[u8]) -> anyhow::Result<Vec<u8>> {
        let mut secure = Secure::connect(&self.home)?;
        let review = Request::Sign { key: key.into(), kind: kind.into(), payload: payload.to_vec(), approved: None, network: None };
        let (summary, digest) = match secure.call(&review)? {
            Reply::Approve { summary, digest } => (summary, digest),
            other => return Err(unexpected(other)),
        };
        let show = |summary: &[String]| {
            eprintln!("the model asks to sign with your key {key:?}:");
            for line in summary {
                eprintln!("  {}", clean(line));
            }
        };
        match &self.approval {
            Approval::Review => {
                *self.reviewed.lock().unwrap_or_else(|e| e.into_inner()) = Some(Review { key: key.into(), summary, digest });
                bail!("waiting for your approval of what is signed");
            }
            Approval::Approved(approved) if *approved != digest => {
                bail!("the model asked to sign something other than what you approved: nothing was signed");
            }
            Approval::Approved(_) => {}
            Approval::Yes => show(&summary),
            Approval::Prompt => {
                use std::io::IsTerminal as _;
                show(&summary);
                if !std::io::stdin().is_terminal() {
                    bail!("not approved: pass --yes to approve without a prompt");
                }
                eprint!("sign? [y/N] ");
                let mut answer = String::new();
                std::io::stdin().read_line(&mut answer)?;
                if !matches!(answer.trim(), "y" | "Y" | "yes") {
                    bail!("not approved: nothing was signed");
                }
            }
        }
        let sign = Request::Sign { key: key.into(), kind: kind.into(), payload: payload.to_vec(), approved: Some(digest), network: None };
        match secure.call(&sign)? {
            Reply::Signed { payload } => Ok(payload),
            other => Err(unexpected(other)),
        }
    }
}

impl Signer for SecureSigner {
    fn sign(&mut self, key: &str, kind: &str, payload: &[u8]) -> Result<Vec<u8>, String> {
        self.ask(key, kind, payload).map_err(|e| format!("{e:#}"))
    }
}

/// How an action is taken: approval and the broadcast hook.
#[derive(Debug, Clone, Default)]
pub struct ActOptions {
    /// How a signing the action needs is approved.
    pub approval: Approval,
    /// The command a step carrying a transaction (a `tx` field) is handed to before it is
    /// sent, e.g. `bitcoin-cli -regtest sendrawtransaction`; it gets the hex as its last
    /// argument, and if it prints a txid it must be the step's.
    pub broadcast_cmd: Option<String>,
}

/// What taking an action came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Acted {
    /// The step was sent: its id.
    Sent(String),
    /// Nothing was sent: the action needs a signing the user has not approved yet
    /// ([`Approval::Review`]).
    Review(Review),
}

/// Runs the broadcast hook for a step whose body carries a transaction.
fn broadcast(message: &Message, options: &ActOptions) -> anyhow::Result<()> {
    let Ok(body) = serde_json::from_str::<serde_json::Value>(&message.body) else { return Ok(()) };
    let Some(tx) = body.get("tx").and_then(|t| t.as_str()) else { return Ok(()) };
    let Some(cmd) = &options.broadcast_cmd else {
        bail!("this step sends a transaction: pass --broadcast-cmd (e.g. \"bitcoin-cli -regtest sendrawtransaction\")");
    };
    let out = std::process::Command::new("sh").arg("-c").arg(format!("{cmd} \"$1\"")).arg("broadcast").arg(tx).output().context("running the broadcast command")?;
    if !out.status.success() {
        bail!("the broadcast command failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    let printed = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if let Some(txid) = body.get("txid").and_then(|t| t.as_str())
        && !printed.is_empty()
        && printed != txid
    {
        bail!("the broadcast command printed {printed}, not the transaction's id {txid}");
    }
    Ok(())
}

/// Loads the pipeline's model and runs it over every step, from the sealed state where it is
/// still good; seals the new state.
pub fn run(home: &Home, pipeline: &str) -> anyhow::Result<Run> {
    let mut secure = Secure::connect(home)?;
    let log = match secure.call(&Request::PipelineLog { pipeline: pipeline.into() })? {
        Reply::Pipeline(log) => *log,
        other => return Err(unexpected(other)),
    };
    if let Some(why) = &log.mismatch {
        bail!("pipeline {}: MODEL MISMATCH, nothing is applied: {}", log.id, clean(why));
    }
    let Some(bytes) = log.bytes.as_deref() else {
        bail!("the model of pipeline {} has not fully arrived yet: try again in a moment", log.id);
    };
    let expected = ModelId(canopy_msg_core::engine::unhex(&log.model).and_then(|b| b.try_into().ok()).context("a model id that is not 64 hex digits")?);
    // The bytes are checked against the id the creation message names before anything runs.
    let model = runtime()?.load_checked(bytes, &expected, Limits::default()).with_context(|| format!("pipeline {}", log.id))?;
    let saved = log.saved.as_ref().filter(|s| s.count <= log.steps.len() && s.digest == digest(&log, s.count));
    let (mut kept, start) = match saved.and_then(|s| Some((serde_json::from_slice::<Kept>(&s.state).ok()?, s.count))) {
        Some(k) => k,
        None => {
            let state = model.init(&log.params, &log.creator, &log.members).with_context(|| format!("the model refuses pipeline {}'s parameters", log.id))?;
            (Kept { state: state.0, ..Kept::default() }, 0)
        }
    };
    let mut state = State(std::mem::take(&mut kept.state));
    for step in &log.steps[start..] {
        let sender = step.user.clone().unwrap_or_default();
        if let Some(prior) = &step.prior
            && *prior != state.hash_hex()
        {
            kept.diverged.push(format!("step {} by {}: its sender's state was {}, this device's {}", step.id, short(&sender), &prior[..12], &state.hash_hex()[..12]));
        }
        match model.apply(&state, &sender, step.time_ms, &Message { kind: step.kind.clone(), body: step.body.clone() }) {
            Ok(next) => state = next,
            Err(e) => kept.refused.push(format!("step {} ({} by {}): {e}", step.id, step.kind, short(&sender))),
        }
    }
    if start < log.steps.len() || saved.is_none() {
        let keep = Kept { state: state.0.clone(), refused: kept.refused.clone(), diverged: kept.diverged.clone() };
        let request = Request::PipelineSave { pipeline: log.id.clone(), count: log.steps.len(), digest: digest(&log, log.steps.len()), state: serde_json::to_vec(&keep)? };
        match secure.call(&request)? {
            Reply::Pong => {}
            other => return Err(unexpected(other)),
        }
    }
    Ok(Run { log, model, state, refused: kept.refused, diverged: kept.diverged })
}

fn short(user: &str) -> String {
    user.chars().take(8).collect()
}

/// `pipeline create MODEL --members U1,U2 [--params JSON] [--name NAME]`.
pub fn create(home: &Home, model_path: &std::path::Path, name: &str, members: &[String], params: &str) -> anyhow::Result<()> {
    let bytes = std::fs::read(model_path).with_context(|| format!("reading {}", model_path.display()))?;
    // A model that does not load, or refuses the parameters, is refused before anything is sent.
    let model = runtime()?.load(&bytes, Limits::default()).with_context(|| format!("{}", model_path.display()))?;
    let mut secure = Secure::connect(home)?;
    let me = match secure.call(&Request::Whoami)? {
        Reply::Whoami { user, .. } => user,
        other => return Err(unexpected(other)),
    };
    let contacts = match secure.call(&Request::Contacts)? {
        Reply::Contacts { contacts } => contacts,
        other => return Err(unexpected(other)),
    };
    let mut users: BTreeSet<String> = [me.clone()].into();
    for m in members {
        let id = contacts.iter().find(|c| c.name.as_deref() == Some(m.as_str()) || c.user == *m).map(|c| c.user.clone());
        users.insert(match id {
            Some(id) => id,
            None if m.len() == 32 && m.bytes().all(|b| b.is_ascii_hexdigit()) => m.to_ascii_lowercase(),
            None => bail!("{m:?} is neither a user id nor a contact's name"),
        });
    }
    let users: Vec<String> = users.into_iter().collect();
    model.init(params, &me, &users).context("the model refuses these parameters")?;
    match secure.call(&Request::PipelineCreate { name: name.into(), users: members.to_vec(), model: bytes, params: params.into() })? {
        Reply::Group { group, .. } => {
            println!("{}", group.id);
            Ok(())
        }
        other => Err(unexpected(other)),
    }
}

/// `pipeline list`.
pub fn list(home: &Home, json: bool) -> anyhow::Result<()> {
    match Secure::connect(home)?.call(&Request::Pipelines)? {
        Reply::Pipelines { pipelines } => {
            for p in pipelines {
                if json {
                    println!("{}", serde_json::to_string(&p)?);
                } else {
                    let waiting = match (&p.model_mismatch, p.model_complete) {
                        (Some(why), _) => format!("  (MODEL MISMATCH, nothing is applied: {})", clean(why)),
                        (None, true) => String::new(),
                        (None, false) => "  (model still arriving)".into(),
                    };
                    println!("{} {} model={} steps={}{waiting}", p.id, clean(&p.name), &p.model[..12], p.steps);
                }
            }
            Ok(())
        }
        other => Err(unexpected(other)),
    }
}

fn render_json(run: &Run, view: &Rendering) -> serde_json::Value {
    serde_json::json!({
        "id": run.log.id,
        "name": run.log.name,
        "model": run.log.model,
        "model_name": run.model.descriptor().name,
        "steps": run.log.steps.len(),
        "state_hash": run.state.hash_hex(),
        "title": view.title,
        "status": view.status,
        "lines": view.lines,
        "actions": view.actions.iter().map(|a| serde_json::json!({"name": a.name, "label": a.label, "args": a.args})).collect::<Vec<_>>(),
        "closed": view.closed,
        "refused": run.refused,
        "diverged": run.diverged,
    })
}

/// `pipeline show ID`.
pub fn show(home: &Home, pipeline: &str, json: bool) -> anyhow::Result<()> {
    let run = run(home, pipeline)?;
    let view = run.model.view(&run.state, &run.log.me)?;
    if json {
        println!("{}", render_json(&run, &view));
        return Ok(());
    }
    let d = run.model.descriptor();
    println!("{} {} (model {} {}, {})", run.log.id, clean(&run.log.name), clean(&d.name), clean(&d.version), &run.log.model[..12]);
    println!("{}", clean(&view.title));
    println!("{}", clean(&view.status));
    for l in &view.lines {
        println!("  {}", clean(l));
    }
    if !view.actions.is_empty() {
        let actions: Vec<String> = view.actions.iter().map(|a| format!("{} {} — {}", clean(&a.name), clean(&a.args.join(" ")), clean(&a.label))).collect();
        println!("actions: {}", actions.join("; "));
    }
    println!("state {} after {} steps{}", &run.state.hash_hex()[..16], run.log.steps.len(), if view.closed { ", closed" } else { "" });
    for r in &run.refused {
        println!("refused: {}", clean(r));
    }
    for d in &run.diverged {
        println!("DIVERGED: {}", clean(d));
    }
    Ok(())
}

/// `pipeline act ID ACTION [ARGS…]`: prints the step's id.
pub fn act(home: &Home, pipeline: &str, action: &str, args: &[String], options: &ActOptions) -> anyhow::Result<()> {
    match act_step(home, pipeline, action, args, options)? {
        Acted::Sent(id) => println!("{id}"),
        Acted::Review(_) => bail!("not approved: nothing was signed"),
    }
    Ok(())
}

/// What the TUI's pipeline pane shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pane {
    /// The pipeline's group id.
    pub id: String,
    /// The model's name and version.
    pub model: String,
    /// The model's rendering for this user.
    pub view: Rendering,
    /// The state hash.
    pub hash: String,
    /// Steps applied.
    pub steps: usize,
    /// Refused steps.
    pub refused: Vec<String>,
    /// Divergences.
    pub diverged: Vec<String>,
}

/// The pane of pipeline `pipeline`: its model run over every step.
pub fn pane(home: &Home, pipeline: &str) -> anyhow::Result<Pane> {
    let run = run(home, pipeline)?;
    let view = run.model.view(&run.state, &run.log.me)?;
    let d = run.model.descriptor();
    Ok(Pane { id: run.log.id.clone(), model: format!("{} {}", d.name, d.version), view, hash: run.state.hash_hex(), steps: run.log.steps.len(), refused: run.refused, diverged: run.diverged })
}

/// Builds the step of an action with the model, checks the model takes it here first, and
/// sends it. With [`Approval::Review`], an action that needs a signing sends nothing and
/// hands back what Secure would sign.
pub fn act_step(home: &Home, pipeline: &str, action: &str, args: &[String], options: &ActOptions) -> anyhow::Result<Acted> {
    let run = run(home, pipeline)?;
    let reviewed = std::sync::Arc::default();
    let signer = SecureSigner { home: home.clone(), approval: options.approval.clone(), reviewed: std::sync::Arc::clone(&reviewed) };
    let acted = run.model.act(&run.state, &run.log.me, action, args, Box::new(signer));
    if let Some(review) = reviewed.lock().unwrap_or_else(|e| e.into_inner()).take() {
        return Ok(Acted::Review(review));
    }
    let message = acted?;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    run.model.apply(&run.state, &run.log.me, now, &message).context("the model refuses this step")?;
    broadcast(&message, options)?;
    let request = Request::PipelineStep { pipeline: run.log.id.clone(), kind: message.kind, body: message.body, prior: Some(run.state.hash_hex()) };
    match Secure::connect(home)?.call(&request)? {
        Reply::Sent { id, .. } => Ok(Acted::Sent(id)),
        other => Err(unexpected(other)),
    }
}
