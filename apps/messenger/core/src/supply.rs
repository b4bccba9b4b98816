//! Key package supply in the users' space: what each device keeps published so anyone can
//! start a conversation with it while it is offline, how a key package is claimed, and how
//! a user's online devices are asked for more (the seed's `PUBLIC_KEY` request/response).
//!
//! **Published.** Each device keeps [`ONE_TIME`] unclaimed **one-time** key packages and one
//! **last-resort** key package (marked with MLS's `last_resort` extension) published under
//! its user's key package names, as Signal and XMTP do. A consumer — a device that starts a
//! conversation or adds a device to one — takes, per device, an unclaimed one-time key
//! package if it knows one, else the last-resort one.
//!
//! **Claims.** Canopy has no server to hand a one-time key package out once, so the consumer
//! publishes a **claim** with its welcome: a chunk at fragment [`CLAIM_FRAGMENT`] of that key
//! package's names, holding the claimant's user id. Every watcher of the user (other
//! consumers, and the device itself) sees it and treats the key package as used; the device
//! publishes a replacement at once. Two consumers can still race for one key package before
//! either's claim reaches the other (a partition makes that likelier). So a device keeps a
//! one-time key package's private keys for [`GRACE_MS`] after its first welcome, and a second
//! welcome in that time joins too; then they are erased. That bounds how long the init key
//! outlives its use: one hour, against the key package lifetime (30 days) of a last-resort
//! key, which is the forward-secrecy gain of one-time keys.
//!
//! **Requests.** When a consumer finds no unclaimed one-time key package of a device, it uses
//! the last-resort one (nothing waits) and publishes a **request** at fragment
//! [`REQUEST_FRAGMENT`] under the user's key package names (the `hKP` field is a random
//! nonce): the target user id, the requester's, and the time. The user's online devices see
//! it (they watch their own user's key package names) and respond by publishing fresh
//! one-time key packages (the response is the key packages themselves, where every consumer
//! already looks), and a fresh last-resort one if theirs is old. A message queued for a user
//! none of whose key packages is known yet sends a request too.

use openmls::prelude::{KeyPackageBundle, KeyPackageRef};
use openmls_traits::OpenMlsProvider as _;
use openmls_traits::random::OpenMlsRand as _;
use openmls_traits::storage::StorageProvider as _;

use crate::committer::Outgoing;
use crate::device::{Device, KnownKeyPackage, Space, Waiting, encode_waiting, waiting_key};
use crate::engine::{MlsError, mls};
use crate::fragment;
use crate::identity::UserId;
use crate::names::{Path, Users};
use crate::seal::Backend;

/// How many unclaimed one-time key packages each device keeps published.
pub const ONE_TIME: usize = 3;
/// How long a used one-time key package's private keys are kept for a second, racing welcome.
pub const GRACE_MS: u64 = 3_600_000;
/// The fragment number of a claim, under the key package's names.
pub const CLAIM_FRAGMENT: u16 = 255;
/// The fragment number of a request, under a user's key package names.
pub const REQUEST_FRAGMENT: u16 = 254;
/// How long a request is kept in the relays.
pub const REQUEST_TTL_MS: u64 = 3_600_000;

const CLAIM: u8 = 1;
const REQUEST: u8 = 2;

/// A request for key packages, as a device of its target reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Whose devices are asked.
    pub target: UserId,
    /// Who asks.
    pub requester: UserId,
    /// When it was made, unix ms.
    pub created_ms: u64,
}

impl Request {
    fn encode(&self) -> Vec<u8> {
        let mut out = vec![REQUEST];
        out.extend_from_slice(&self.target.0);
        out.extend_from_slice(&self.requester.0);
        out.extend_from_slice(&self.created_ms.to_be_bytes());
        out
    }

    /// Decodes a request chunk; `None` if it is not one.
    pub fn decode(data: &[u8]) -> Option<Request> {
        if data.len() != 41 || data[0] != REQUEST {
            return None;
        }
        Some(Request {
            target: UserId(data[1..17].try_into().ok()?),
            requester: UserId(data[17..33].try_into().ok()?),
            created_ms: u64::from_be_bytes(data[33..41].try_into().ok()?),
        })
    }
}

/// What this device has published in its users' space, for `status`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Supply {
    /// One-time key packages published and not claimed.
    pub one_time: usize,
    /// One-time key packages claimed and not welcomed yet.
    pub claimed: usize,
    /// One-time key packages welcomed, whose keys are kept for the grace period.
    pub used: usize,
    /// Last-resort key packages.
    pub last_resort: usize,
}

/// A key package reference from its bytes (an hKP).
fn kp_ref(hkp: &[u8]) -> Option<KeyPackageRef> {
    use openmls::prelude::tls_codec::Deserialize as _;
    // Its TLS form: a one-byte length (under 64) and the bytes.
    let mut tls = vec![u8::try_from(hkp.len()).ok().filter(|n| *n < 64)?];
    tls.extend_from_slice(hkp);
    KeyPackageRef::tls_deserialize_exact(&tls).ok()
}

/// The whole key package name of `kp` without its fragment byte: what claims are keyed by.
pub(crate) fn kp_whole(kp: &KnownKeyPackage, user: &UserId) -> Option<u128> {
    Some(Users::at(kp.origin).key_package(user, &kp.hkp, 0).ok()?.to_u128() >> 8)
}

impl<B: Backend> Device<B> {
    /// Keeps this device's key packages in its users' space supplied: a fresh last-resort
    /// one (made less than half of `ttl_ms` ago) and [`ONE_TIME`] unclaimed one-time ones.
    /// Erases one-time keys [`GRACE_MS`] after their first welcome, and those that expired
    /// unused. Returns the chunks of what was made.
    pub fn ensure_key_package(&mut self, now_ms: u64, ttl_ms: u64) -> Result<Vec<Outgoing>, MlsError> {
        let mut erase = Vec::new();
        let mut changed = Vec::new();
        for (hkp, w) in self.waiting.iter_mut().filter(|(_, w)| w.space == Space::Users && w.one_time) {
            match w.used_ms {
                // Welcomed during an ingest, which has no clock: the grace starts now.
                Some(0) => {
                    w.used_ms = Some(now_ms.max(1));
                    changed.push((hkp.clone(), *w));
                }
                Some(t) if t.saturating_add(GRACE_MS) <= now_ms => erase.push(hkp.clone()),
                None if w.created_ms.saturating_add(ttl_ms) <= now_ms => erase.push(hkp.clone()),
                _ => {}
            }
        }
        let changed_any = !changed.is_empty() || !erase.is_empty();
        for (hkp, w) in changed {
            self.engine.vault.put(&waiting_key(&hkp), &encode_waiting(&w));
        }
        for hkp in erase {
            self.waiting.remove(&hkp);
            self.engine.vault.delete(&waiting_key(&hkp));
            self.engine.vault.put(format!("ws/{}", crate::engine::hex(&hkp)).as_bytes(), b"");
            self.spent.insert(hkp.clone());
            if let Some(r) = kp_ref(&hkp) {
                self.engine.provider.storage().delete_key_package(&r).map_err(mls)?;
            }
        }
        let fresh = |w: &Waiting| w.created_ms.saturating_add(ttl_ms / 2) > now_ms;
        let mut outgoing = Vec::new();
        if !self.waiting.values().any(|w| w.space == Space::Users && !w.one_time && fresh(w)) {
            outgoing.extend(self.publish_key_package(true, now_ms, ttl_ms)?);
        }
        let available = self.waiting.values().filter(|w| w.space == Space::Users && w.one_time && !w.claimed && w.used_ms.is_none() && fresh(w)).count();
        for _ in available..ONE_TIME {
            outgoing.extend(self.publish_key_package(false, now_ms, ttl_ms)?);
        }
        // Called after every ingested batch: it writes only when it changed something.
        if changed_any || !outgoing.is_empty() {
            self.engine.persist()?;
        }
        Ok(outgoing)
    }

    fn publish_key_package(&mut self, last_resort: bool, now_ms: u64, ttl_ms: u64) -> Result<Vec<Outgoing>, MlsError> {
        let (bytes, hkp) = self.engine.key_package(last_resort)?;
        let users = self.users();
        let me = self.user_id();
        let pieces = fragment::split(Path::KeyPackage, &bytes)?;
        if pieces.len() > usize::from(REQUEST_FRAGMENT) {
            return Err(MlsError::Mls("a key package of more fragments than its names have room for".into()));
        }
        let mut outgoing = Vec::new();
        for (i, data) in pieces.into_iter().enumerate() {
            outgoing.push(Outgoing { name: users.key_package(&me, &hkp, i as u16)?, expiry_ms: now_ms + ttl_ms, data });
        }
        let w = Waiting { space: Space::Users, created_ms: now_ms, link: false, one_time: !last_resort, claimed: false, used_ms: None };
        self.engine.vault.put(&waiting_key(&hkp), &encode_waiting(&w));
        self.waiting.insert(hkp, w);
        Ok(outgoing)
    }

    /// What this device has published in its users' space.
    pub fn supply(&self) -> Supply {
        let mut s = Supply::default();
        for w in self.waiting.values().filter(|w| w.space == Space::Users) {
            match (w.one_time, w.claimed, w.used_ms) {
                (false, ..) => s.last_resort += 1,
                (true, _, Some(_)) => s.used += 1,
                (true, true, None) => s.claimed += 1,
                (true, false, None) => s.one_time += 1,
            }
        }
        s
    }

    /// How many key package claims this device has seen or made.
    pub fn claimed_count(&self) -> usize {
        self.claimed.len()
    }

    /// The key package to add each known device of `user` with (other than this device): an
    /// unclaimed one-time one if there is one, else the last-resort one. Consumers prefer
    /// one-time key packages in an order of their own, so two that race seldom pick the same.
    pub fn key_packages_of(&self, user: &UserId) -> impl Iterator<Item = &KnownKeyPackage> {
        let me = self.user_id();
        self.known.get(user).into_iter().flat_map(|d| d.values()).filter_map(move |device| {
            let unclaimed = device
                .one_time
                .values()
                .filter(|k| kp_whole(k, user).is_some_and(|w| !self.claimed.contains(&w)))
                .min_by_key(|k| crate::names::mix(&me.0, &k.hkp));
            unclaimed.or(device.last_resort.as_ref()).or_else(|| device.one_time.values().next())
        })
    }

    /// The claims and requests that go with a commit adding `kps`: a claim for each one-time
    /// key package, a request to each user one of whose devices was added with its last-resort
    /// key package. Marks the one-time ones claimed here.
    pub(crate) fn claims_for(&mut self, kps: &[KnownKeyPackage], now_ms: u64) -> Result<Vec<Outgoing>, MlsError> {
        let me = self.user_id();
        let mut outgoing = Vec::new();
        let mut asked = std::collections::BTreeSet::new();
        for kp in kps {
            let Some(user) = crate::identity::claimed_user(kp.key_package.leaf_node().credential()) else { continue };
            if kp.key_package.last_resort() {
                if asked.insert((kp.origin, user)) {
                    outgoing.push(self.request(kp.origin, user, now_ms)?);
                }
                continue;
            }
            let mut data = vec![CLAIM];
            data.extend_from_slice(&me.0);
            outgoing.push(Outgoing { name: Users::at(kp.origin).key_package(&user, &kp.hkp, CLAIM_FRAGMENT)?, expiry_ms: now_ms + crate::payload::Lifetimes::default().welcome_ms, data });
            if let Some(w) = kp_whole(kp, &user) {
                self.claimed.insert(w);
            }
        }
        Ok(outgoing)
    }

    /// A request to `user`'s devices for fresh key packages, in the users' space at `origin`.
    pub fn request(&mut self, origin: u32, user: UserId, now_ms: u64) -> Result<Outgoing, MlsError> {
        let nonce: [u8; 3] = self.engine.provider.rand().random_array().map_err(|e| MlsError::Mls(format!("randomness: {e:?}")))?;
        let data = Request { target: user, requester: self.user_id(), created_ms: now_ms }.encode();
        Ok(Outgoing { name: Users::at(origin).key_package(&user, &nonce, REQUEST_FRAGMENT)?, expiry_ms: now_ms + REQUEST_TTL_MS, data })
    }

    /// A claim or a request under a key package name.
    pub(crate) fn on_kp_control(&mut self, name: canopy::Name, data: &[u8], events: &mut Vec<crate::device::Event>) {
        let whole = name.to_u128() >> 8;
        match (name.to_u128() & 0xff) as u16 {
            CLAIM_FRAGMENT => {
                if data.len() != 17 || data[0] != CLAIM {
                    return self.reject(name, "a key package claim that is not one".into(), events);
                }
                self.claimed.insert(whole);
                // One of this device's own: a replacement goes out with the next supply check.
                let users = self.users();
                let me = self.user_id();
                let mine = self.waiting.iter_mut().find(|(hkp, w)| w.space == Space::Users && w.one_time && users.key_package(&me, hkp, 0).is_ok_and(|n| n.to_u128() >> 8 == whole));
                if let Some((hkp, w)) = mine
                    && !w.claimed
                {
                    w.claimed = true;
                    let (hkp, w) = (hkp.clone(), *w);
                    self.engine.vault.put(&waiting_key(&hkp), &encode_waiting(&w));
                }
            }
            _ => {
                let Some(request) = Request::decode(data) else {
                    return self.reject(name, "a key package request that is not one".into(), events);
                };
                if request.target != self.user_id() || !self.seen_requests.insert(whole) {
                    return;
                }
                if self.contacts().is_blocked(&request.requester) {
                    self.counters.blocked += 1;
                    return;
                }
                self.counters.requests += 1;
                events.push(crate::device::Event::KeyPackagesRequested { by: request.requester });
            }
        }
    }

    /// Around processing a welcome for the one-time key packages `hkps`: their bundles, so
    /// they can be put back after openmls deletes them (kept for [`GRACE_MS`]).
    pub(crate) fn keep_one_time(&self, hkps: &[Vec<u8>]) -> Vec<(KeyPackageRef, KeyPackageBundle)> {
        hkps.iter()
            .filter_map(|h| {
                let r = kp_ref(h)?;
                let bundle: KeyPackageBundle = self.engine.provider.storage().key_package(&r).ok()??;
                Some((r, bundle))
            })
            .collect()
    }

    /// Puts back what [`Device::keep_one_time`] kept, and starts their grace period.
    pub(crate) fn restore_one_time(&mut self, kept: Vec<(KeyPackageRef, KeyPackageBundle)>) -> Result<(), MlsError> {
        for (r, bundle) in kept {
            self.engine.provider.storage().write_key_package(&r, &bundle).map_err(mls)?;
            if let Some(w) = self.waiting.get_mut(r.as_slice())
                && w.used_ms.is_none()
            {
                w.used_ms = Some(0);
                w.claimed = true;
                let w = *w;
                self.engine.vault.put(&waiting_key(r.as_slice()), &encode_waiting(&w));
            }
        }
        Ok(())
    }
}
