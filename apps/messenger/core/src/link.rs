//! `device link`: a new device of a user, given the user's identity by a device the user
//! already has.
//!
//! 1. The new device runs `device key-package --link`: a single-use key package in its org's
//!    space, marked as a link request. Until it is linked it has a provisional user of its
//!    own.
//! 2. A device of the user runs `device link HKP`: it fetches the key package, checks it
//!    hashes to the hKP given (the out-of-band step that makes this safe, as for a team add),
//!    makes a group of kind `Link` for the user's devices, adds the new device, and sends it
//!    the user's identity key pair inside that group, so it travels only under MLS
//!    encryption to the device the user named.
//! 3. The new device takes a `Link` welcome only for a key package it made with `--link`,
//!    and an identity only from that group's committer. It then binds its credential to the
//!    user and publishes a key package under the user, and every committer of the user's
//!    conversations adds it, as it adds any new device of a member ([`crate::conv`]).

use openmls_traits::OpenMlsProvider as _;

use crate::committer::Outgoing;
use crate::device::{CONV_CHANNEL, Device, Event, KnownKeyPackage, Stored};
use crate::engine::{self, MlsError, Record};
use crate::fragment::Fragment;
use crate::identity::UserId;
use crate::names::{Gid, Path, hkp54};
use crate::payload::{ConvKind, Message};
use crate::seal::Backend;

impl<B: Backend> Device<B> {
    /// `device link HKP`: asks for the key package `hkp`, published by a device that wants to
    /// become this user's. Returns the filter to subscribe to; the link is made by
    /// [`Device::run_links`] once the key package has arrived.
    pub fn request_link(&mut self, hkp: &[u8]) -> canopy::Filter {
        self.linking.insert(hkp54(hkp), hkp.to_vec());
        self.org.key_package_filter(hkp)
    }

    /// hKPs asked for and not linked yet, and those linked.
    pub fn links(&self) -> (Vec<&[u8]>, Vec<&[u8]>) {
        (self.linking.values().map(Vec::as_slice).collect(), self.linked.iter().map(Vec::as_slice).collect())
    }

    pub(crate) fn on_link_key_package(&mut self, name: canopy::Name, top: u64, data: &[u8], events: &mut Vec<Event>) {
        let Some(hkp) = self.linking.get(&top).cloned() else { return };
        let f = match Fragment::decode(Path::KeyPackage, data) {
            Ok(f) => f,
            Err(e) => return self.reject(name, format!("key package fragment: {e}"), events),
        };
        let asm = self.link_parts.entry(top).or_default();
        if let Err(e) = asm.add(f) {
            return self.reject(name, format!("key package fragment: {e}"), events);
        }
        let Some(object) = asm.finish() else { return };
        self.link_parts.remove(&top);
        match object {
            Ok(bytes) => self.link_ready.push((hkp, bytes)),
            Err(e) => self.reject(name, format!("key package: {e}"), events),
        }
    }

    /// Makes the links whose key packages have arrived. Returns the chunks to publish, and
    /// what could not be linked (the request is dropped: run `device link` again).
    pub fn run_links(&mut self, now_ms: u64) -> (Vec<Outgoing>, Vec<String>) {
        let mut out = Vec::new();
        let mut failed = Vec::new();
        for (hkp, bytes) in std::mem::take(&mut self.link_ready) {
            self.linking.remove(&hkp54(&hkp));
            match self.link_device(&hkp, &bytes, now_ms) {
                Ok(o) => {
                    out.extend(o);
                    self.linked.push(hkp);
                }
                Err(e) => failed.push(format!("key package {}: {e}", engine::hex(&hkp))),
            }
        }
        (out, failed)
    }

    /// Welcomes the device of key package `bytes` (which must hash to `hkp`) to a new group
    /// of this user's devices, and hands it the user's identity there.
    pub fn link_device(&mut self, hkp: &[u8], bytes: &[u8], now_ms: u64) -> Result<Vec<Outgoing>, MlsError> {
        let checked = engine::read_key_package(self.engine.provider.crypto(), bytes)?;
        if checked.hkp != hkp {
            return Err(MlsError::HkpMismatch { expected: engine::hex(hkp), found: engine::hex(&checked.hkp) });
        }
        if checked.key_package.leaf_node().signature_key().as_slice() == self.public_key() {
            return Err(MlsError::BadName("that is this device's own key package".into()));
        }
        let me = self.user_id();
        let (conv, mut out) = self.start_conv(ConvKind::Link, "devices", &[me].into(), now_ms)?;
        let record = self.conv_record(conv).cloned().expect("just made");
        let kp = KnownKeyPackage { origin: self.org.origin(), hkp: checked.hkp.clone(), key_package: checked.key_package };
        out.extend(self.commit_conv(conv, record, vec![kp], Vec::new(), now_ms)?);
        let (_, o) = self.send(conv, CONV_CHANNEL, Message::identity(now_ms, self.engine.user_key_pair()), now_ms)?;
        out.extend(o);
        Ok(out)
    }

    /// An identity handed over in a `Link` group: taken only from the group's committer, by a
    /// device that asked to be linked (and so is in the group).
    pub(crate) fn take_identity(&mut self, g: Gid, stored: &Stored) -> Result<UserId, String> {
        let Some(Record::Conv(record)) = self.groups.get(&g).map(|t| t.record.clone()) else { return Err("an identity outside a devices' group".into()) };
        if record.kind != ConvKind::Link || stored.id.device != 0 || stored.user != Some(record.creator) {
            return Err("an identity not from the committer of a devices' group".into());
        }
        if self.user_id() == record.creator {
            // This device is the user's already (a replay after the link): nothing to do.
            return Ok(record.creator);
        }
        let blob = stored.message.identity.as_deref().ok_or("no identity")?;
        let user = self.engine.adopt_user(blob).map_err(|e| e.to_string())?;
        if user != record.creator {
            return Err(format!("an identity of {user}, not of the group's user {}", record.creator));
        }
        // The provisional user's key packages in the users' space go; a fresh one, bound to
        // the user, is published next.
        let stale: Vec<Vec<u8>> = self.waiting.iter().filter(|(_, w)| w.space == crate::device::Space::Users).map(|(h, _)| h.clone()).collect();
        for hkp in stale {
            self.waiting.remove(&hkp);
            self.engine.vault.delete(&crate::device::waiting_key(&hkp));
        }
        self.engine.persist().map_err(|e| e.to_string())?;
        Ok(user)
    }
}
