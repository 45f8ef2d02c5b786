//! ns per decision of the policy file's rules with 10 and with 10,000 rules: the indexes should make the two
//! columns about equal (issue 13: matching cost independent of the number of rules in the common case).
//!
//! A hand-written timing loop like benches/parse.rs: calibrated ~20 ms batches, best of 5 reported.
//!
//! `cargo bench --bench rules`

use std::hint::black_box;
use std::net::{IpAddr, SocketAddr};

use socksgate::auth::Users;
use socksgate::policy::{self, rules::Command, Policy};

#[path = "support/timing.rs"]
mod timing;
use timing::ns_per_call as time;

/// A policy of `n` deny rules cycling through the pattern kinds: `*.sN.test`, `eN.test`, `.bN.test`, an IPv4 /24,
/// and a name with a port range.
fn policy_with(n: usize) -> Policy {
    let mut text = String::new();
    for i in 0..n {
        let dest = match i % 5 {
            0 => format!("*.s{i}.test"),
            1 => format!("e{i}.test"),
            2 => format!(".b{i}.test"),
            3 => format!("10.{}.{}.0/24", (i >> 8) & 255, i & 255),
            _ => format!("p{i}.test:8000-8099"),
        };
        text.push_str(&format!(
            "[[rules]]\ndest = [\"{dest}\"]\naction = \"deny\"\n"
        ));
    }
    match policy::parse(&text, "bench.toml", Users::default()) {
        Ok((_, p)) => p,
        Err(e) => panic!("bench policy: {e:?}"),
    }
}

/// One timed decision: the policy and its rule count.
type Case = Box<dyn Fn(&Policy, usize) -> bool>;

fn main() {
    let client: IpAddr = [127, 0, 0, 1].into();
    let cases: [(&str, Case); 4] = [
        (
            "name, no rule matches (the common case)",
            Box::new(move |p: &Policy, _| {
                p.check_name(None, client, Command::Connect, "www.example.test", 443)
                    .is_ok()
            }),
        ),
        (
            "name, the last rule matches",
            Box::new(move |p: &Policy, n| {
                let name = format!("e{}.test", (n - 1) / 5 * 5 + 1);
                p.check_name(None, client, Command::Connect, black_box(&name), 443)
                    .is_ok()
            }),
        ),
        (
            "address, no rule matches",
            Box::new(move |p: &Policy, _| {
                let a: SocketAddr = ([192, 0, 2, 7], 443).into();
                p.allows_addr(None, client, Command::Connect, Some("www.example.test"), a)
            }),
        ),
        (
            "address in the last /24 rule",
            Box::new(move |p: &Policy, n| {
                let i = (n - 1) / 5 * 5 + 3;
                let a: SocketAddr = ([10, ((i >> 8) & 255) as u8, (i & 255) as u8, 9], 443).into();
                p.allows_addr(None, client, Command::Connect, None, a)
            }),
        ),
    ];
    let small = policy_with(10);
    let large = policy_with(10_000);
    println!(
        "{:<42} {:>12} {:>14} {:>7}",
        "case", "10 rules ns", "10000 rules ns", "ratio"
    );
    for (name, f) in &cases {
        let a = time(|| f(&small, 10));
        let b = time(|| f(&large, 10_000));
        println!("{name:<42} {a:>12.1} {b:>14.1} {:>6.2}x", b / a);
    }
}
