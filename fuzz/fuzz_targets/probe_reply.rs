//! Probe reply matching: the first byte picks how a probe judges (a preset,
//! or an `expect` prefix taken from the next bytes), the rest is the reply.
//! Any reply gets a verdict, and a verdict reached on a prefix is the
//! verdict on the whole reply, since probes judge as bytes arrive.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice::config::schema::Preset;
use sluice::config::HealthProbe;
use sluice::health::judge_reply;

fuzz_target!(|data: &[u8]| {
    let Some((&choice, rest)) = data.split_first() else {
        return;
    };
    let (settings, reply) = match choice % 5 {
        0 => (preset(Preset::Redis), rest),
        1 => (preset(Preset::Memcached), rest),
        2 => (preset(Preset::Postgres), rest),
        3 => (preset(Preset::Mysql), rest),
        _ => {
            let split = (rest.first().copied().unwrap_or(1) as usize % 8 + 1).min(rest.len());
            let (expect, reply) = rest.split_at(split);
            let Ok(expect) = std::str::from_utf8(expect) else {
                return;
            };
            let settings = HealthProbe {
                expect: Some(expect.to_owned()),
                ..HealthProbe::default()
            };
            (settings, reply)
        }
    };
    let kind = |reply: &[u8]| {
        judge_reply(&settings, reply).map(|v| v.map_err(|f| std::mem::discriminant(&f)))
    };
    let whole = kind(reply);
    if let Some(first) = (0..=reply.len()).find_map(|end| kind(&reply[..end])) {
        assert_eq!(Some(first), whole);
    }
});

fn preset(preset: Preset) -> HealthProbe {
    HealthProbe {
        preset: Some(preset),
        ..HealthProbe::default()
    }
}
