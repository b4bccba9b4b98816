//! Pipelines as the core keeps them, in one process: the model's bytes arrive in parts from
//! the creator only and are checked against the id its creation message names before the UI
//! sees them; a creator whose parts are another model is caught before anything is applied;
//! every device orders the steps alike.

mod common;

use canopy_msg_core::device::{CONV_CHANNEL, Device, Event};
use canopy_msg_core::names::ConvId;
use canopy_msg_core::payload::{MAX_MODEL_PART, Pipeline};
use canopy_msg_core::{Key, MemoryBackend, Message, Org};
use common::*;
use sha2::{Digest, Sha256};

const TTL: u64 = 30 * 24 * 3600 * 1000;

fn user(relay: &mut Relay, org: u32) -> Device<MemoryBackend> {
    let mut d = Device::open(Key::random(), MemoryBackend::default(), Org::new("example.com", org).unwrap()).unwrap();
    relay.publish(&d.ensure_key_package(NOW, TTL).unwrap());
    d
}

fn sync(relay: &Relay, devices: &mut [&mut Device<MemoryBackend>]) -> Vec<Vec<Event>> {
    let mut out = vec![Vec::new(); devices.len()];
    for _ in 0..2 {
        for (i, d) in devices.iter_mut().enumerate() {
            out[i].extend(feed(d, &relay.all()));
        }
    }
    out
}

/// A model-sized blob spanning several parts; `seed` makes another one of the same size.
fn blob(seed: u8) -> Vec<u8> {
    (0..(2 * MAX_MODEL_PART + 100)).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

fn step(d: &mut Device<MemoryBackend>, relay: &mut Relay, conv: ConvId, kind: &str, at: u64) {
    let (_, out) = d.pipeline_step(conv, kind, "{}", None, at).unwrap();
    relay.publish(&out);
}

#[test]
fn the_model_arrives_checked_from_its_creator_and_every_device_orders_the_steps_alike() {
    let mut relay = Relay::default();
    let (mut a, mut b, mut c) = (user(&mut relay, 7), user(&mut relay, 8), user(&mut relay, 9));
    sync(&relay, &mut [&mut a]);
    let model = blob(1);
    let (conv, out) = a.create_pipeline("p", &[b.user_id(), c.user_id()].into(), &model, r#"{"k":2}"#, NOW).unwrap();
    relay.publish(&out);
    sync(&relay, &mut [&mut a, &mut b, &mut c]);
    // A member's part for the same model, sent "earlier", is not the creator's: ignored.
    let forged = Pipeline::ModelPart { model: Sha256::digest(&model).into(), index: 0, bytes: vec![0; MAX_MODEL_PART] };
    relay.publish(&b.send(conv, CONV_CHANNEL, Message::pipeline(NOW - 1, forged), NOW).unwrap().1);
    // Steps sent out of time order are applied in time order everywhere.
    step(&mut b, &mut relay, conv, "late", NOW + 20);
    step(&mut c, &mut relay, conv, "early", NOW + 10);
    sync(&relay, &mut [&mut a, &mut b, &mut c]);
    for d in [&a, &b, &c] {
        let log = d.pipeline_log(conv).expect("a pipeline");
        assert_eq!(log.creator, a.user_id());
        assert_eq!((log.bytes.as_deref(), log.mismatch.as_deref()), (Some(model.as_slice()), None));
        assert_eq!(log.params, r#"{"k":2}"#);
        let kinds: Vec<&str> = log.steps.iter().map(|s| s.kind.as_str()).collect();
        assert_eq!(kinds, ["early", "late"]);
        assert_eq!(log.steps[1].sender, Some(b.user_id()));
    }
}

#[test]
fn a_creator_whose_parts_are_not_the_named_model_is_caught_before_anything_is_applied() {
    let mut relay = Relay::default();
    let (mut a, mut b) = (user(&mut relay, 7), user(&mut relay, 8));
    sync(&relay, &mut [&mut a]);
    let (conv, out) = a.create_group("p", &[b.user_id()].into(), NOW).unwrap();
    relay.publish(&out);
    // A hostile creator names one model and ships another of the same size.
    let (named, shipped) = (blob(1), blob(2));
    let create = Pipeline::Create { model: Sha256::digest(&named).into(), size: named.len() as u32, params: "{}".into() };
    relay.publish(&a.send(conv, CONV_CHANNEL, Message::pipeline(NOW, create), NOW).unwrap().1);
    let parts: Vec<Pipeline> =
        shipped.chunks(MAX_MODEL_PART).enumerate().map(|(i, p)| Pipeline::ModelPart { model: Sha256::digest(&named).into(), index: i as u32, bytes: p.to_vec() }).collect();
    let (first, rest) = parts.split_first().unwrap();
    relay.publish(&a.send(conv, CONV_CHANNEL, Message::pipeline(NOW, first.clone()), NOW).unwrap().1);
    sync(&relay, &mut [&mut b]);
    let log = b.pipeline_log(conv).unwrap();
    assert_eq!((log.bytes.is_none(), log.mismatch.is_none()), (true, true), "still arriving, not yet a mismatch");
    for p in rest {
        relay.publish(&a.send(conv, CONV_CHANNEL, Message::pipeline(NOW, p.clone()), NOW).unwrap().1);
    }
    step(&mut a, &mut relay, conv, "go", NOW + 1);
    sync(&relay, &mut [&mut b]);
    let log = b.pipeline_log(conv).unwrap();
    assert!(log.bytes.is_none(), "the shipped bytes never reach the UI");
    let why = log.mismatch.expect("a mismatch");
    assert!(why.contains("not the model") && why.contains(&canopy_msg_core::engine::hex(&Sha256::digest(&named))[..16]), "{why}");
    assert_eq!(log.steps.len(), 1, "the steps are kept; the UI applies none of them");
}
