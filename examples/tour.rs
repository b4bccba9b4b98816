//! A quick tour of the Canopy core: names, schemas, filters, the subscription table and chunks.
//!
//! Run with `cargo run -p canopy-examples --example tour`.

use canopy::{Chunk, Filter, MAX_CHUNK_DATA, Name, Schema, SubscriptionTable};

fn heading(title: &str) {
    println!("\n== {title} ==");
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    heading("Names are 128-bit numbers, shown in hex");
    println!("  {}", Name::new(42));
    println!("  {}", Name::MAX);

    heading("The messenger schema");
    let schema = Schema::messenger();
    println!("  layout: {schema}");
    for (field, width, offset) in schema.fields() {
        println!("  {field:>8}: {width:>2} bits at offset {offset:>3}");
    }

    heading("Packing a message name");
    let origin = schema.hash_text("origin", "example.com")?;
    println!("  origin = top 24 bits of SHA-256(\"example.com\") = {origin:#08x} ({origin})");
    let name = schema.pack_fields(&[
        ("origin", origin),
        ("app", 1),
        ("path", 1), // 1 = message
        ("org", 7),
        ("team", 5),
        ("channel", 3),
        ("device", 9),
        ("msg", 42),
    ])?;
    println!("  hex:    {name}");
    println!("  schema: {}", schema.render(name));

    heading("Filters: every name with the same leading fields");
    let channel = schema.filter(&[origin, 1, 1, 7, 5, 3])?;
    let team = schema.filter_fields(&[
        ("origin", origin),
        ("app", 1),
        ("path", 1),
        ("org", 7),
        ("team", 5),
    ])?;
    for (label, filter) in [("channel", channel), ("team", team)] {
        println!("  {label:>7}: {filter}");
        println!("  {:>7}  {}", "", schema.render_filter(filter));
    }

    heading("Who receives the message?");
    let other_channel = schema.filter(&[origin, 1, 1, 7, 5, 4])?;
    let mut table = SubscriptionTable::<u32>::new();
    table.insert(team, 1);
    table.insert(channel, 2);
    table.insert(other_channel, 3);
    table.insert(Filter::ALL, 4);
    for (who, filter) in [(1, team), (2, channel), (3, other_channel), (4, Filter::ALL)] {
        println!("  subscriber {who} -> {}", schema.render_filter(filter));
    }
    let mut hits = Vec::new();
    table.for_each_match(name, |v| hits.push(v));
    hits.sort_unstable();
    println!("  matches for the message: {hits:?}");

    heading("Chunks carry at most 1 KiB");
    let chunk = Chunk::new(name, 1_700_000_000_000, &b"hello, team 5"[..])?;
    println!("  built: {chunk:?}");
    match Chunk::new(name, 1_700_000_000_000, vec![0u8; MAX_CHUNK_DATA + 1]) {
        Ok(_) => println!("  unexpectedly built an oversized chunk"),
        Err(err) => println!("  1025 bytes: error: {err}"),
    }
    Ok(())
}
