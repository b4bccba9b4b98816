//! What the committer and a member device share: the MLS provider whose state is sealed in a
//! [`Vault`], the device's signing identity, and the group configuration every team uses.

use openmls::prelude::tls_codec::{Deserialize as _, Serialize as _};
use openmls::prelude::*;
use openmls_basic_credential::SignatureKeyPair;
use crate::crypto::Provider;
use std::collections::HashMap;

use crate::identity::{self, Binding, BindingError, UserId};
use crate::names::{ConvId, Gid, Org};
use crate::payload::{CONV_EXTENSION, ConvRecord, Lifetimes, PayloadError, TEAM_EXTENSION, TeamRecord};
use crate::seal::{Backend, Contents, Key, SealError, Vault};

/// The one ciphersuite the messenger speaks.
pub const CIPHERSUITE: Ciphersuite = Ciphersuite::MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519;
/// Past epochs whose secrets a member keeps, so messages sent just before a commit still
/// decrypt after it (openmls keeps none by default).
pub const MAX_PAST_EPOCHS: usize = 8;
/// Messages of one sender that may arrive out of order within an epoch.
pub const OUT_OF_ORDER_TOLERANCE: u32 = 256;
/// How far ahead of the last message of a sender a message may be.
pub const MAX_FORWARD_DISTANCE: u32 = 10_000;

/// Why an MLS operation failed.
#[derive(Debug, thiserror::Error)]
pub enum MlsError {
    /// Sealed storage failed.
    #[error(transparent)]
    Seal(#[from] SealError),
    /// openmls refused or failed.
    #[error("MLS: {0}")]
    Mls(String),
    /// Bytes that are not the MLS object expected.
    #[error("malformed {what}: {detail}")]
    Malformed {
        /// What was expected.
        what: &'static str,
        /// Why it was refused.
        detail: String,
    },
    /// A key package whose hash is not the hKP given.
    #[error("the key package's hKP is {found}, not {expected}")]
    HkpMismatch {
        /// The hKP asked for.
        expected: String,
        /// The key package's own.
        found: String,
    },
    /// An unknown team.
    #[error("unknown team {0}")]
    UnknownTeam(String),
    /// An unknown channel.
    #[error("unknown channel {0}")]
    UnknownChannel(String),
    /// A team or channel name that cannot be used.
    #[error("{0}")]
    BadName(String),
    /// The team record in a group is missing or malformed.
    #[error("team record: {0}")]
    Record(#[from] PayloadError),
    /// A name field overflowed.
    #[error(transparent)]
    Name(#[from] crate::names::NameError),
    /// A fragment problem.
    #[error(transparent)]
    Fragment(#[from] crate::fragment::FragmentError),
    /// A device credential without a valid binding to its user.
    #[error(transparent)]
    Binding(#[from] BindingError),
    /// A contact operation was refused.
    #[error(transparent)]
    Contact(#[from] crate::contacts::ContactError),
}

pub(crate) fn mls<E: std::fmt::Display>(e: E) -> MlsError {
    MlsError::Mls(e.to_string())
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Reads lowercase or uppercase hex; `None` if it is not hex.
pub fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok()).collect()
}

/// The MLS group id of `team` in `org`: `canopy-msg` ‖ origin (3 bytes) ‖ org (4) ‖ team (4).
pub fn group_id(org: &Org, team: u32) -> GroupId {
    let mut id = b"canopy-msg".to_vec();
    id.extend_from_slice(&org.origin().to_be_bytes()[1..]);
    id.extend_from_slice(&org.org().to_be_bytes());
    id.extend_from_slice(&team.to_be_bytes());
    GroupId::from_slice(&id)
}

/// The MLS group id of a conversation: `canopy-conv` ‖ origin (3 bytes) ‖ number (6).
pub fn conv_group_id(conv: ConvId) -> GroupId {
    let mut id = b"canopy-conv".to_vec();
    id.extend_from_slice(&conv.origin.to_be_bytes()[1..]);
    id.extend_from_slice(&conv.conv.to_be_bytes()[2..]);
    GroupId::from_slice(&id)
}

/// The MLS group id of a team of `org` or of a conversation.
pub fn gid_group_id(org: &Org, gid: Gid) -> GroupId {
    match gid {
        Gid::Team(team) => group_id(org, team),
        Gid::Conv(conv) => conv_group_id(conv),
    }
}

/// Leaf capabilities: the team and conversation records' extension types must be supported
/// by every member.
pub fn capabilities() -> Capabilities {
    Capabilities::new(
        None,
        Some(&[CIPHERSUITE]),
        // A last-resort key package carries its marker as an extension its leaf must list.
        Some(&[ExtensionType::Unknown(TEAM_EXTENSION), ExtensionType::Unknown(CONV_EXTENSION), ExtensionType::LastResort]),
        None,
        Some(&[CredentialType::Basic]),
    )
}

/// How every group is created: the join configuration's rules, for its creator.
pub fn create_config(extensions: Extensions<GroupContext>) -> MlsGroupCreateConfig {
    MlsGroupCreateConfig::builder()
        .ciphersuite(CIPHERSUITE)
        .capabilities(capabilities())
        .max_past_epochs(MAX_PAST_EPOCHS)
        .sender_ratchet_configuration(SenderRatchetConfiguration::new(OUT_OF_ORDER_TOLERANCE, MAX_FORWARD_DISTANCE))
        .use_ratchet_tree_extension(true)
        .wire_format_policy(PURE_CIPHERTEXT_WIRE_FORMAT_POLICY)
        .with_group_context_extensions(extensions)
        .build()
}

/// The group context extensions carrying a conversation's `record`.
pub fn conv_extensions(record: &ConvRecord) -> Result<Extensions<GroupContext>, MlsError> {
    let required = RequiredCapabilitiesExtension::new(&[ExtensionType::Unknown(CONV_EXTENSION)], &[], &[CredentialType::Basic]);
    Extensions::from_vec(vec![
        Extension::RequiredCapabilities(required),
        Extension::Unknown(CONV_EXTENSION, UnknownExtension(record.encode())),
    ])
    .map_err(mls)
}

/// What a group's context says about it: a team record or a conversation record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// A team of an org.
    Team(TeamRecord),
    /// A direct message or a group.
    Conv(ConvRecord),
}

impl Record {
    /// The device id of a leaf.
    pub fn device_of(&self, leaf: u32) -> Option<u32> {
        match self {
            Record::Team(r) => r.device_of(leaf),
            Record::Conv(r) => r.devices.get(&leaf).copied(),
        }
    }

    /// Lifetimes of what the group publishes.
    pub fn lifetimes(&self) -> &Lifetimes {
        match self {
            Record::Team(r) => &r.lifetimes,
            Record::Conv(r) => &r.lifetimes,
        }
    }

    /// The group it describes, for a device of `org`.
    pub fn gid(&self) -> Gid {
        match self {
            Record::Team(r) => Gid::Team(r.team),
            Record::Conv(r) => Gid::Conv(r.conv),
        }
    }

    /// A name for people.
    pub fn name(&self) -> &str {
        match self {
            Record::Team(r) => &r.name,
            Record::Conv(r) => &r.name,
        }
    }
}

impl Record {
    /// The record's bytes, with a tag for its kind (`1` team, `2` conversation).
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Record::Team(r) => [vec![1], r.encode()].concat(),
            Record::Conv(r) => [vec![2], r.encode()].concat(),
        }
    }

    /// Reads what [`Record::encode`] wrote. Never panics.
    pub fn decode(bytes: &[u8]) -> Result<Record, PayloadError> {
        match bytes.split_first() {
            Some((1, rest)) => Ok(Record::Team(TeamRecord::decode(rest)?)),
            Some((2, rest)) => Ok(Record::Conv(ConvRecord::decode(rest)?)),
            Some((k, _)) => Err(PayloadError::Unsupported { version: 0, kind: *k }),
            None => Err(PayloadError::Truncated),
        }
    }
}

/// The record a group carries, whichever kind it is.
pub fn any_record_of(group: &MlsGroup) -> Result<Record, MlsError> {
    if let Some(ext) = group.extensions().unknown(CONV_EXTENSION) {
        return Ok(Record::Conv(ConvRecord::decode(&ext.0)?));
    }
    Ok(Record::Team(record_of(group)?))
}

/// How every member runs a team's group.
pub fn join_config() -> MlsGroupJoinConfig {
    MlsGroupJoinConfig::builder()
        .max_past_epochs(MAX_PAST_EPOCHS)
        .sender_ratchet_configuration(SenderRatchetConfiguration::new(OUT_OF_ORDER_TOLERANCE, MAX_FORWARD_DISTANCE))
        .use_ratchet_tree_extension(true)
        .wire_format_policy(PURE_CIPHERTEXT_WIRE_FORMAT_POLICY)
        .build()
}

/// The group context extensions carrying `record`.
pub fn record_extensions(record: &TeamRecord) -> Result<Extensions<GroupContext>, MlsError> {
    // Required capabilities make every joiner's key package declare support for the record.
    let required = RequiredCapabilitiesExtension::new(&[ExtensionType::Unknown(TEAM_EXTENSION)], &[], &[CredentialType::Basic]);
    Extensions::from_vec(vec![
        Extension::RequiredCapabilities(required),
        Extension::Unknown(TEAM_EXTENSION, UnknownExtension(record.encode())),
    ])
    .map_err(mls)
}

/// The team record a group carries.
pub fn record_of(group: &MlsGroup) -> Result<TeamRecord, MlsError> {
    let ext = group.extensions().unknown(TEAM_EXTENSION).ok_or(MlsError::Malformed { what: "group", detail: "no team record".into() })?;
    Ok(TeamRecord::decode(&ext.0)?)
}

/// The MLS state of one device (or of the committer), sealed at rest.
pub struct Engine<B: Backend> {
    pub(crate) provider: Provider,
    pub(crate) vault: Vault<B>,
    pub(crate) signer: SignatureKeyPair,
    pub(crate) credential: CredentialWithKey,
    /// The user's identity key, which signs the bindings of the user's devices.
    pub(crate) user: SignatureKeyPair,
    /// Groups already loaded, by group id. openmls writes every change through to the
    /// provider's storage, so a group here is what loading it again would give, as long as
    /// only operations that succeeded put it back (see [`Engine::take_group`]). Loading
    /// means decoding the group's JSON from storage, which was most of a message's cost.
    groups: HashMap<Vec<u8>, MlsGroup>,
}

const IDENTITY: &[u8] = b"identity";
/// The user's public key; the key pair itself is in the (sealed) MLS storage.
const USER: &[u8] = b"user";

impl<B: Backend> Engine<B> {
    /// Opens the state sealed in `backend` with `key`, creating a signing identity labelled
    /// `label` on first use. Returns the application records too.
    pub fn open(key: Key, backend: B, label: &str) -> Result<(Engine<B>, Contents), MlsError> {
        let (mut vault, contents) = Vault::open(key, backend)?;
        let provider = Provider::default();
        provider.storage().values.write().expect("openmls storage lock").extend(contents.mls.iter().map(|(k, v)| (k.clone(), v.clone())));
        let scheme = CIPHERSUITE.signature_algorithm();
        let signer = match contents.app.get(IDENTITY) {
            Some(public) => {
                // The label is kept from part 1 for reading old state; the credential now
                // carries the binding to the user instead.
                let (_label, public) = split_identity(public)?;
                SignatureKeyPair::read(provider.storage(), public, scheme)
                    .ok_or(MlsError::Malformed { what: "state", detail: "the signing key is missing".into() })?
            }
            None => {
                let signer = SignatureKeyPair::new(scheme).map_err(mls)?;
                signer.store(provider.storage()).map_err(mls)?;
                let mut record = (label.len() as u16).to_be_bytes().to_vec();
                record.extend_from_slice(label.as_bytes());
                record.extend_from_slice(signer.public());
                vault.put(IDENTITY, &record);
                vault.stage_mls(provider.storage());
                vault.commit()?;
                signer
            }
        };
        let user = match contents.app.get(USER) {
            Some(public) => SignatureKeyPair::read(provider.storage(), public, scheme)
                .ok_or(MlsError::Malformed { what: "state", detail: "the user key is missing".into() })?,
            None => {
                let user = SignatureKeyPair::new(scheme).map_err(mls)?;
                user.store(provider.storage()).map_err(mls)?;
                vault.put(USER, user.public());
                vault.stage_mls(provider.storage());
                vault.commit()?;
                user
            }
        };
        let binding = Binding::sign(&user, user.public(), signer.public())?;
        let credential = CredentialWithKey { credential: binding.credential(), signature_key: signer.to_public_vec().into() };
        Ok((Engine { provider, vault, signer, credential, user, groups: HashMap::new() }, contents))
    }

    /// The user this device belongs to.
    pub fn user_id(&self) -> UserId {
        UserId::of(self.user.public())
    }

    /// The user's public identity key.
    pub fn user_key(&self) -> &[u8] {
        self.user.public()
    }

    /// The user's identity key pair, serialized, to hand to a new device of the user over an
    /// MLS group (`device link`). Never written anywhere else.
    pub(crate) fn user_key_pair(&self) -> Vec<u8> {
        serde_json::to_vec(&self.user).expect("a key pair serializes")
    }

    /// Takes on the user whose key pair `blob` is (from [`Engine::user_key_pair`] on another
    /// device): the key is checked to sign, stored sealed, and this device's credential is
    /// bound to it from now on. Returns the user.
    pub(crate) fn adopt_user(&mut self, blob: &[u8]) -> Result<UserId, MlsError> {
        let bad = |detail: &str| MlsError::Malformed { what: "identity transfer", detail: detail.to_string() };
        let user: SignatureKeyPair = serde_json::from_slice(blob).map_err(|_| bad("not a key pair"))?;
        if user.signature_scheme() != SignatureScheme::ED25519 || user.public().len() != identity::PUBLIC_KEY_LEN {
            return Err(bad("not an Ed25519 key pair"));
        }
        // A key pair whose private half does not match its public half would bind nothing.
        let binding = Binding::sign(&user, user.public(), self.signer.public())?;
        binding.verify(self.provider.crypto(), self.signer.public()).map_err(|_| bad("the private key does not match the public key"))?;
        user.store(self.provider.storage()).map_err(mls)?;
        self.vault.put(USER, user.public());
        self.credential = CredentialWithKey { credential: binding.credential(), signature_key: self.signer.to_public_vec().into() };
        self.user = user;
        self.persist()?;
        Ok(self.user_id())
    }

    /// The device's public signature key.
    pub fn public_key(&self) -> &[u8] {
        self.signer.public()
    }

    /// Stages the MLS changes of the operation just done and writes them, with whatever
    /// application records were staged, as one batch.
    pub fn persist(&mut self) -> Result<(), MlsError> {
        self.vault.stage_mls(self.provider.storage());
        Ok(self.vault.commit()?)
    }

    /// As [`persist`](Self::persist), but not yet durably: see [`Vault::write`].
    pub fn write(&mut self) -> Result<(), MlsError> {
        self.vault.stage_mls(self.provider.storage());
        self.vault.write()?;
        Ok(())
    }

    /// Makes everything written so far durable.
    pub fn sync(&mut self) -> Result<(), MlsError> {
        Ok(self.vault.sync()?)
    }

    /// A team's group, to read.
    pub fn group(&mut self, org: &Org, team: u32) -> Result<Option<&MlsGroup>, MlsError> {
        self.group_by_id(&group_id(org, team))
    }

    /// A group by its MLS group id, to read.
    pub fn group_by_id(&mut self, id: &GroupId) -> Result<Option<&MlsGroup>, MlsError> {
        if !self.groups.contains_key(id.as_slice()) {
            let Some(group) = MlsGroup::load(self.provider.storage(), id).map_err(mls)? else { return Ok(None) };
            self.groups.insert(id.to_vec(), group);
        }
        Ok(self.groups.get(id.as_slice()))
    }

    /// Takes a group out by its MLS group id: see [`Engine::take_group`].
    pub fn take_group_by_id(&mut self, id: &GroupId) -> Result<Option<MlsGroup>, MlsError> {
        match self.groups.remove(id.as_slice()) {
            Some(group) => Ok(Some(group)),
            None => MlsGroup::load(self.provider.storage(), id).map_err(mls),
        }
    }

    /// Creates a group with this device alone in it, at epoch 0.
    pub fn create_group(&mut self, id: GroupId, extensions: Extensions<GroupContext>) -> Result<MlsGroup, MlsError> {
        MlsGroup::new_with_group_id(&self.provider, &self.signer, &create_config(extensions), id, self.credential.clone()).map_err(mls)
    }

    /// Commits `adds` and `removes` together with new group context `extensions`, merges the
    /// commit, and returns it with the welcome for the added (if any).
    pub fn commit(
        &mut self,
        group: &mut MlsGroup,
        adds: Vec<KeyPackage>,
        removes: Vec<LeafNodeIndex>,
        extensions: Extensions<GroupContext>,
    ) -> Result<(Vec<u8>, Option<Vec<u8>>), MlsError> {
        let bundle = group
            .commit_builder()
            .propose_adds(adds)
            .propose_removals(removes)
            .propose_group_context_extensions(extensions)
            .map_err(mls)?
            .load_psks(self.provider.storage())
            .map_err(mls)?
            .build(self.provider.rand(), self.provider.crypto(), &self.signer, |_| true)
            .map_err(mls)?
            .stage_commit(&self.provider)
            .map_err(mls)?;
        let commit = bundle.commit().tls_serialize_detached().map_err(mls)?;
        let welcome = match bundle.to_welcome_msg() {
            Some(w) => Some(w.tls_serialize_detached().map_err(mls)?),
            None => None,
        };
        group.merge_pending_commit(&self.provider).map_err(mls)?;
        Ok((commit, welcome))
    }

    /// Takes a team's group out, to change it. Give it back with [`Engine::keep_group`] once
    /// the openmls operation on it has succeeded. A group not given back (the operation
    /// failed, and may have left the object and the storage apart) is loaded again from
    /// storage next time, as if it had never been cached.
    pub fn take_group(&mut self, org: &Org, team: u32) -> Result<Option<MlsGroup>, MlsError> {
        self.take_group_by_id(&group_id(org, team))
    }

    /// Gives back a group taken with [`Engine::take_group`], or made or joined just now.
    pub fn keep_group(&mut self, group: MlsGroup) {
        self.groups.insert(group.group_id().to_vec(), group);
    }

    /// A fresh single-use key package: its serialized form and its hKP.
    pub fn key_package(&mut self, last_resort: bool) -> Result<(Vec<u8>, Vec<u8>), MlsError> {
        let mut builder = KeyPackage::builder().leaf_node_capabilities(capabilities());
        if last_resort {
            builder = builder.mark_as_last_resort();
        }
        let bundle = builder.build(CIPHERSUITE, &self.provider, &self.signer, self.credential.clone()).map_err(mls)?;
        let kp = bundle.key_package();
        let hkp = kp.hash_ref(self.provider.crypto()).map_err(mls)?.as_slice().to_vec();
        let bytes = MlsMessageOut::from(kp.clone()).tls_serialize_detached().map_err(mls)?;
        self.persist()?;
        Ok((bytes, hkp))
    }
}

fn split_identity(record: &[u8]) -> Result<(Vec<u8>, &[u8]), MlsError> {
    let bad = || MlsError::Malformed { what: "identity record", detail: "truncated".into() };
    let n = usize::from(u16::from_be_bytes(record.get(..2).ok_or_else(bad)?.try_into().expect("2 bytes")));
    let label = record.get(2..2 + n).ok_or_else(bad)?.to_vec();
    Ok((label, record.get(2 + n..).ok_or_else(bad)?))
}

/// A key package read and checked: its signature, its ciphersuite, and its binding to the
/// user it claims.
#[derive(Debug, Clone)]
pub struct CheckedKeyPackage {
    /// The key package.
    pub key_package: KeyPackage,
    /// Its hKP.
    pub hkp: Vec<u8>,
    /// The user its credential is bound to.
    pub user: UserId,
}

/// Reads a serialized key package and checks its signature, ciphersuite and user binding.
pub fn read_key_package(crypto: &impl openmls_traits::crypto::OpenMlsCrypto, bytes: &[u8]) -> Result<CheckedKeyPackage, MlsError> {
    let msg = MlsMessageIn::tls_deserialize_exact(bytes).map_err(|e| MlsError::Malformed { what: "key package", detail: e.to_string() })?;
    let kp_in = match msg.extract() {
        MlsMessageBodyIn::KeyPackage(kp) => kp,
        _ => return Err(MlsError::Malformed { what: "key package", detail: "another kind of MLS message".into() }),
    };
    let kp = kp_in.validate(crypto, ProtocolVersion::Mls10).map_err(|e| MlsError::Malformed { what: "key package", detail: e.to_string() })?;
    if kp.ciphersuite() != CIPHERSUITE {
        return Err(MlsError::Malformed { what: "key package", detail: format!("ciphersuite {:?}", kp.ciphersuite()) });
    }
    let user = identity::check(crypto, kp.leaf_node().credential(), kp.leaf_node().signature_key().as_slice())?;
    let hkp = kp.hash_ref(crypto).map_err(mls)?.as_slice().to_vec();
    Ok(CheckedKeyPackage { key_package: kp, hkp, user })
}

/// Reads a serialized key package, checks it ([`read_key_package`]), and checks that its hKP
/// is `hkp`.
pub fn verify_key_package(crypto: &impl openmls_traits::crypto::OpenMlsCrypto, bytes: &[u8], hkp: &[u8]) -> Result<KeyPackage, MlsError> {
    let checked = read_key_package(crypto, bytes)?;
    if checked.hkp != hkp {
        return Err(MlsError::HkpMismatch { expected: hex(hkp), found: hex(&checked.hkp) });
    }
    Ok(checked.key_package)
}
