//! What the core's integration tests share: a first-write-wins map standing in for the
//! relay tree, and a team with its committer.
#![allow(dead_code)]

use std::collections::BTreeMap;

use canopy::Name;
use canopy_msg_core::committer::Committer;
use canopy_msg_core::device::{Device, Event};
use canopy_msg_core::fragment::{Assembly, Fragment};
use canopy_msg_core::names::Path;
use canopy_msg_core::payload::Lifetimes;
use canopy_msg_core::{Key, MemoryBackend, Message, Org, Outgoing};

pub const NOW: u64 = 1_800_000_000_000;

/// The relay tree, reduced to what MLS needs from it: first write wins.
#[derive(Default)]
pub struct Relay {
    pub chunks: BTreeMap<Name, Vec<u8>>,
}

impl Relay {
    pub fn publish(&mut self, out: &[Outgoing]) -> Vec<(Name, Vec<u8>)> {
        for o in out {
            self.chunks.entry(o.name).or_insert_with(|| o.data.clone());
        }
        out.iter().map(|o| (o.name, o.data.clone())).collect()
    }
    pub fn all(&self) -> Vec<(Name, Vec<u8>)> {
        self.chunks.iter().map(|(n, d)| (*n, d.clone())).collect()
    }
    pub fn object(&self, kind: Path, filter: canopy::Filter) -> Vec<u8> {
        let mut asm = Assembly::new();
        for (name, data) in &self.chunks {
            if filter.matches(*name) {
                asm.add(Fragment::decode(kind, data).unwrap()).unwrap();
            }
        }
        asm.finish().unwrap().unwrap()
    }
}

pub fn feed(device: &mut Device<MemoryBackend>, chunks: &[(Name, Vec<u8>)]) -> Vec<Event> {
    device.ingest(chunks.iter().map(|(n, d)| (*n, d.as_slice()))).unwrap()
}

pub fn org() -> Org {
    Org::new("example.com", 7).unwrap()
}

pub fn text(t: &str) -> Message {
    Message::text(NOW, t)
}

pub struct World {
    pub relay: Relay,
    pub admin: Committer<MemoryBackend>,
    pub team: u32,
    pub channel: u16,
}

impl World {
    pub fn new() -> World {
        let mut admin = Committer::open(Key::random(), MemoryBackend::default(), org()).unwrap();
        admin.org_init().unwrap();
        let team = admin.create_team("ops", Lifetimes::default()).unwrap();
        assert_eq!(team, 2, "team 1 carries device management");
        let mut relay = Relay::default();
        let (channel, epoch, out) = admin.create_channel(team, "general", NOW).unwrap();
        assert_eq!((channel, epoch), (2, 1), "channel 1 carries team management");
        relay.publish(&out);
        World { relay, admin, team, channel }
    }

    /// A device publishes a key package, the admin adds it by hKP, the device joins.
    pub fn join(&mut self, key: Key, backend: MemoryBackend) -> (Device<MemoryBackend>, u32) {
        let mut device = Device::open(key, backend, org()).unwrap();
        let (hkp, out) = device.key_package(NOW, 3_600_000, false).unwrap();
        self.relay.publish(&out);
        let kp = self.relay.object(Path::KeyPackage, org().key_package_filter(&hkp));
        let added = self.admin.add_device(self.team, &kp, &hkp, NOW).unwrap();
        self.relay.publish(&added.outgoing);
        let events = feed(&mut device, &self.relay.all());
        assert!(events.contains(&Event::Joined { group: self.team.into(), device: added.device }), "{events:?}");
        (device, added.device)
    }
}

