//! Pipelines in a device's history (`docs/pipelines.md`): a pipeline is a group whose
//! creator's first message is a [`Pipeline::Create`], followed by the model's bytes in
//! [`Pipeline::ModelPart`]s and then [`Pipeline::Step`]s that every member's device applies
//! in one order. The model runs in the UI process; this module only keeps and orders what
//! the group carries, and seals the UI's state between runs.

use std::collections::{BTreeMap, BTreeSet};

use sha2::{Digest, Sha256};

use crate::committer::Outgoing;
use crate::device::{CONV_CHANNEL, Device};
use crate::engine::{MlsError, hex};
use crate::identity::UserId;
use crate::names::ConvId;
use crate::payload::{MAX_MODEL, MAX_MODEL_PART, Message, MsgRef, Pipeline};
use crate::seal::Backend;

/// One step of a pipeline, as every member orders it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// Its message id in the group.
    pub id: MsgRef,
    /// Who sent it.
    pub sender: Option<UserId>,
    /// When its sender wrote it, unix ms.
    pub time_ms: u64,
    /// The message type.
    pub kind: String,
    /// The body.
    pub body: String,
    /// The sender's state hash before it.
    pub prior: Option<[u8; 32]>,
}

/// What a device holds of a pipeline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Log {
    /// Its group.
    pub conv: ConvId,
    /// Who created it.
    pub creator: UserId,
    /// The model's id (SHA-256 of its bytes).
    pub model: [u8; 32],
    /// The model's size.
    pub size: u32,
    /// The creator's parameters.
    pub params: String,
    /// The group's users, in id order.
    pub members: Vec<UserId>,
    /// The model's bytes, once every part has arrived and they hash to `model`.
    pub bytes: Option<Vec<u8>>,
    /// Set when every part has arrived but they do not make the model the creation message
    /// names (another size or hash): the pipeline's model is not this one, and nothing may be
    /// applied. Says what was found.
    pub mismatch: Option<String>,
    /// Its steps in the order every member applies them: by the sender's time, then by
    /// message id (the same on every device).
    pub steps: Vec<Step>,
}

/// The UI's state of a pipeline, sealed in Secure's store between runs.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Saved {
    /// How many steps it has applied.
    pub count: usize,
    /// A digest of those steps' ids, the UI's own: a late step sorted in among them makes the
    /// state stale.
    pub digest: [u8; 32],
    /// The state's bytes.
    pub state: Vec<u8>,
}

fn saved_key(conv: ConvId) -> Vec<u8> {
    format!("{SAVED_PREFIX}{conv}").into_bytes()
}

/// Where the sealed states live in the vault: this prefix and the group's id.
pub(crate) const SAVED_PREFIX: &str = "ps/";

impl<B: Backend> Device<B> {
    /// Creates a pipeline: a group of this user (its admin) and `users`, whose first message
    /// names the model and its parameters, followed by the model's bytes.
    pub fn create_pipeline(&mut self, name: &str, users: &BTreeSet<UserId>, model: &[u8], params: &str, now_ms: u64) -> Result<(ConvId, Vec<Outgoing>), MlsError> {
        if model.is_empty() || model.len() > MAX_MODEL {
            return Err(MlsError::BadName(format!("a model of {} bytes: it must be 1 byte to {MAX_MODEL}", model.len())));
        }
        let id: [u8; 32] = Sha256::digest(model).into();
        let (conv, mut outgoing) = self.create_group(name, users, now_ms)?;
        let create = Pipeline::Create { model: id, size: model.len() as u32, params: params.to_string() };
        outgoing.extend(self.send(conv, CONV_CHANNEL, Message::pipeline(now_ms, create), now_ms)?.1);
        for (index, part) in model.chunks(MAX_MODEL_PART).enumerate() {
            let part = Pipeline::ModelPart { model: id, index: index as u32, bytes: part.to_vec() };
            outgoing.extend(self.send(conv, CONV_CHANNEL, Message::pipeline(now_ms, part), now_ms)?.1);
        }
        Ok((conv, outgoing))
    }

    /// Sends a step.
    pub fn pipeline_step(&mut self, conv: ConvId, kind: &str, body: &str, prior: Option<[u8; 32]>, now_ms: u64) -> Result<(MsgRef, Vec<Outgoing>), MlsError> {
        if !self.is_pipeline(conv) {
            return Err(MlsError::BadName(format!("group {conv} is no pipeline")));
        }
        self.send(conv, CONV_CHANNEL, Message::pipeline(now_ms, Pipeline::Step { kind: kind.into(), body: body.into(), prior }), now_ms)
    }

    /// The pipelines this device is in.
    pub fn pipelines(&self) -> Vec<ConvId> {
        self.chat_groups().map(|(c, _)| c).filter(|c| self.is_pipeline(*c)).collect()
    }

    /// Whether group `conv` is a pipeline (a creation message from an admin), without
    /// assembling its model or steps: what listings ask.
    pub fn is_pipeline(&self, conv: ConvId) -> bool {
        let Some(record) = self.conv_record(conv) else { return false };
        let Some(history) = self.groups.get(&conv.into()).and_then(|g| g.history.get(&CONV_CHANNEL)) else { return false };
        history.values().any(|s| matches!((&s.message.pipeline, s.user), (Some(Pipeline::Create { .. }), Some(u)) if record.admins.contains(&u)))
    }

    /// What this device holds of the pipeline in group `conv`; `None` if the group is no
    /// pipeline (no creation message from an admin).
    pub fn pipeline_log(&self, conv: ConvId) -> Option<Log> {
        let record = self.conv_record(conv)?;
        let history = self.groups.get(&conv.into())?.history.get(&CONV_CHANNEL)?;
        let mut ordered: Vec<_> = history.values().filter(|s| s.message.pipeline.is_some()).collect();
        ordered.sort_by_key(|s| (s.message.created_ms, s.id));
        // The creation: the first from an admin. Blocking does not apply inside a pipeline:
        // every member must apply the same steps.
        let (creator, model, size, params) = ordered.iter().find_map(|s| match (&s.message.pipeline, s.user) {
            (Some(Pipeline::Create { model, size, params }), Some(u)) if record.admins.contains(&u) => Some((u, *model, *size, params.clone())),
            _ => None,
        })?;
        let mut parts: BTreeMap<u32, &[u8]> = BTreeMap::new();
        let mut steps = Vec::new();
        for s in &ordered {
            match &s.message.pipeline {
                Some(Pipeline::ModelPart { model: m, index, bytes }) if *m == model && s.user == Some(creator) => {
                    parts.entry(*index).or_insert(bytes);
                }
                Some(Pipeline::Step { kind, body, prior }) => {
                    steps.push(Step { id: s.id, sender: s.user, time_ms: s.message.created_ms, kind: kind.clone(), body: body.clone(), prior: *prior });
                }
                _ => {}
            }
        }
        let n = (size as usize).div_ceil(MAX_MODEL_PART) as u32;
        let assembled = (0..n).all(|i| parts.contains_key(&i)).then(|| (0..n).flat_map(|i| parts[&i].iter().copied()).collect::<Vec<u8>>());
        // The parts are checked against the creation message's id here, before the UI gets
        // them: bytes that are not the named model never reach a model runtime.
        let (bytes, mismatch) = match assembled {
            None => (None, None),
            Some(b) => {
                let hash: [u8; 32] = Sha256::digest(&b).into();
                if b.len() == size as usize && hash == model {
                    (Some(b), None)
                } else {
                    let found = format!("{} bytes with SHA-256 {}", b.len(), &hex(&hash)[..16]);
                    (None, Some(format!("the creator's model parts make {found}, not the model {} ({size} bytes) its creation message names", &hex(&model)[..16])))
                }
            }
        };
        Some(Log { conv, creator, model, size, params, members: record.users.iter().copied().collect(), bytes, mismatch, steps })
    }

    /// The UI's sealed state of a pipeline.
    pub fn pipeline_saved(&self, conv: ConvId) -> Option<&Saved> {
        self.pipeline_states.get(&conv)
    }

    /// Seals the UI's state of a pipeline.
    pub fn save_pipeline(&mut self, conv: ConvId, saved: &Saved) -> Result<(), MlsError> {
        self.engine.vault.put(&saved_key(conv), &serde_json::to_vec(saved).expect("serializable"));
        self.pipeline_states.insert(conv, saved.clone());
        self.engine.persist()
    }
}
