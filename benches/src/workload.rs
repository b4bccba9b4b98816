//! Generated subscription sets and lookup traffic.

use canopy::{Filter, Name, Schema};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// How filter lengths are drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LengthMix {
    /// Uniformly random in 8..=128.
    Random,
    /// Uniformly among the messenger schema's field boundaries (24, 32, 40, 58, 78, 88, 108,
    /// 128): channel, team, device, … filters.
    Messenger,
}

impl LengthMix {
    /// Both mixes, for iteration.
    pub const ALL: [LengthMix; 2] = [LengthMix::Random, LengthMix::Messenger];

    /// Short label for bench ids.
    pub fn label(self) -> &'static str {
        match self {
            LengthMix::Random => "len8-128",
            LengthMix::Messenger => "messenger",
        }
    }

    fn lengths(self) -> Vec<u8> {
        match self {
            LengthMix::Random => (8..=128).collect(),
            LengthMix::Messenger => Schema::messenger()
                .fields()
                .map(|(_, width, offset)| offset + width)
                .collect(),
        }
    }
}

/// How many pre-generated lookup names the matching benches cycle through (a power of two, so
/// the index wraps with a mask): enough that large tables are not served from cache.
pub const LOOKUP_NAMES: usize = 1 << 20;

/// How lookup names are drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Traffic {
    /// Uniformly random names: mostly misses below the first levels.
    Random,
    /// Names under a randomly chosen stored filter, low bits random: every lookup hits at
    /// least one filter, and walks as deep as the filters go.
    Hit,
}

impl Traffic {
    /// Both kinds, for iteration.
    pub const ALL: [Traffic; 2] = [Traffic::Random, Traffic::Hit];

    /// Short label for bench ids.
    pub fn label(self) -> &'static str {
        match self {
            Traffic::Random => "random",
            Traffic::Hit => "hit",
        }
    }
}

/// `n` subscriptions: random names masked to lengths drawn from `mix`, value = index.
pub fn subscriptions(n: usize, mix: LengthMix, seed: u64) -> Vec<(Filter, u32)> {
    let lengths = mix.lengths();
    let mut rng = SmallRng::seed_from_u64(seed);
    (0..n)
        .map(|i| {
            let len = lengths[rng.random_range(0..lengths.len())];
            let filter = Filter::new(Name::new(rng.random()), len).expect("len <= 128");
            (filter, i as u32)
        })
        .collect()
}

/// `count` lookup names for `subs`.
pub fn lookups(subs: &[(Filter, u32)], traffic: Traffic, count: usize, seed: u64) -> Vec<Name> {
    let mut rng = SmallRng::seed_from_u64(seed);
    (0..count)
        .map(|_| match traffic {
            Traffic::Random => Name::new(rng.random()),
            Traffic::Hit => {
                let (filter, _) = subs[rng.random_range(0..subs.len())];
                let noise: u128 = rng.random();
                Name::new(filter.name().to_u128() | (noise & !filter.mask()))
            }
        })
        .collect()
}
