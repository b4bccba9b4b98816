//! Every decoder of bytes that come from the network or a relay's cache, in one function: what
//! the `payloads` fuzz target (`apps/messenger/core/fuzz`) and the never-panics property test
//! feed arbitrary bytes to. Nothing may panic, and whatever decodes must encode again to
//! something that decodes to the same value.

use crate::engine::Record;
use crate::fragment::{Assembly, Fragment};
use crate::identity::Binding;
use crate::names::{Path, Users};
use crate::payload::{ConvRecord, Message, TeamRecord};

/// Runs every decoder over `data`.
pub fn untrusted(data: &[u8]) {
    if let Ok(m) = Message::decode(data)
        && let Ok(again) = m.encode()
    {
        assert_eq!(Message::decode(&again).as_ref(), Ok(&m), "a decoded message re-encodes to itself");
    }
    if let Ok(r) = TeamRecord::decode(data) {
        assert_eq!(TeamRecord::decode(&r.encode()).as_ref(), Ok(&r));
    }
    if let Ok(r) = ConvRecord::decode(data) {
        assert_eq!(ConvRecord::decode(&r.encode()).as_ref(), Ok(&r));
    }
    if let Ok(r) = Record::decode(data) {
        assert!(Record::decode(&r.encode()).is_ok());
    }
    if let Ok(b) = Binding::decode(data) {
        assert!(Binding::decode(&b.encode()).is_ok());
    }
    let _ = crate::supply::Request::decode(data);
    // As fragments of each kind of object, one by one and then assembled, in the order the
    // input's halves give.
    for path in [Path::Message, Path::KeyPackage, Path::Welcome, Path::Commit] {
        let mut assembly = Assembly::new();
        let (a, b) = data.split_at(data.len() / 2);
        for piece in [a, b, data] {
            if let Ok(f) = Fragment::decode(path, piece) {
                let _ = assembly.add(f);
            }
        }
        let _ = assembly.finish();
    }
    // As a name in the users' space.
    if data.len() >= 16 {
        let _ = Users::parse(canopy::Name::new(u128::from_be_bytes(data[..16].try_into().expect("16 bytes"))));
    }
}
