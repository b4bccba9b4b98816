//! A test DNS server: authoritative for one zone, in process, on 127.0.0.1 (hickory-server),
//! with SRV, A and TXT records built here. Shared by the SDK's and the relay's discovery tests.
#![allow(dead_code)]

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use hickory_server::Server;
use hickory_server::proto::rr::rdata::{A, SOA, SRV, TXT};
use hickory_server::proto::rr::{Name, RData, Record};
use hickory_server::store::in_memory::InMemoryZoneHandler;
use hickory_server::zone_handler::{AxfrPolicy, Catalog, ZoneType};

pub fn n(s: &str) -> Name {
    Name::from_ascii(s).unwrap()
}

pub fn srv(owner: &str, priority: u16, weight: u16, port: u16, target: &str) -> Record {
    Record::from_rdata(n(owner), 60, RData::SRV(SRV::new(priority, weight, port, n(target))))
}

pub fn a(owner: &str) -> Record {
    Record::from_rdata(n(owner), 60, RData::A(A(Ipv4Addr::LOCALHOST)))
}

pub fn txt(owner: &str, text: &str) -> Record {
    Record::from_rdata(n(owner), 60, RData::TXT(TXT::new(vec![text.to_string()])))
}

/// An authoritative server for `origin` on 127.0.0.1 (UDP, a free port), serving `records`;
/// it stops when the returned task is aborted or the test ends.
pub async fn dns(origin: &str, records: Vec<Record>) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let zone = n(origin);
    let mut handler: InMemoryZoneHandler = InMemoryZoneHandler::empty(zone.clone(), ZoneType::Primary, AxfrPolicy::Deny);
    let soa = SOA::new(n(&format!("ns.{zone}")), n(&format!("admin.{zone}")), 1, 3600, 600, 86400, 5);
    assert!(handler.upsert_mut(Record::from_rdata(zone.clone(), 60, RData::SOA(soa)), 1));
    for r in records {
        assert!(handler.upsert_mut(r, 1));
    }
    let mut catalog = Catalog::new();
    catalog.upsert(zone.into(), vec![Arc::new(handler)]);
    let socket = tokio::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let addr = socket.local_addr().unwrap();
    let mut server = Server::new(catalog);
    server.register_socket(socket);
    let task = tokio::spawn(async move {
        let _ = server.block_until_done().await;
    });
    (addr, task)
}

