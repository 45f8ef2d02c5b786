use super::*;

fn load(text: &str) -> Loaded {
    let users = Users::from_pairs(&[("bob".into(), "pw".into())]).unwrap();
    parse(text, "p.toml", users)
}

fn errors(text: &str) -> Vec<String> {
    match load(text) {
        Ok(_) => panic!("accepted:\n{text}"),
        Err(e) => e,
    }
}

const EXAMPLE: &str = r#"
[defaults]
max_connections = 100
rules_default = "allow"

[users.alice]
password = "s3cret"
max_connections = 4
egress = ["127.0.0.2", "127.0.1.0/24"]
groups = ["staff"]

[[rules]]
groups = ["staff"]
dest = [".corp.test"]
action = "allow"

[[rules]]
users = ["alice"]
clients = ["10.0.0.0/8"]
commands = ["connect", "http"]
dest = ["*.blocked.test", "exact.test", ".corp.test", "10.0.0.0/8", "127.0.0.1:8000-8099", ":25"]
action = "deny"

[upstreams.corp]
servers = ["socks5://user:pass@127.0.0.1:1081", "http://127.0.0.1:3128"]
strategy = "failover"
"#;

#[test]
fn example_loads() {
    let (users, p) = load(EXAMPLE).unwrap();
    assert!(users.verify(b"alice", b"s3cret").is_some());
    assert!(users.verify(b"bob", b"pw").is_some());
    assert_eq!(p.rule_count(), 2);
    assert_eq!(p.max_connections("alice", Some(9)), Some(4));
    assert_eq!(p.max_connections("bob", Some(9)), Some(100));
    assert_eq!(p.egress(Some("alice")).len(), 2);
    let lo: IpAddr = "127.0.0.1".parse().unwrap();
    assert_eq!(
        p.check_name(Some("alice"), lo, Command::Connect, "x.corp.test", 80),
        Ok(())
    );
    assert_eq!(
        p.check_name(None, lo, Command::Connect, "a..b", 80),
        Err(Refusal::BadName)
    );
}

#[test]
fn errors_name_line_and_key() {
    let e = errors("[users.bob]\nrate_dwn = \"1MiB/s\"\n");
    assert_eq!(e.len(), 1);
    assert!(
        e[0].starts_with("p.toml:2: rate_dwn: unknown field"),
        "{}",
        e[0]
    );
    let e = errors("[defaults]\nmax_connections = 0\n");
    assert_eq!(
        e,
        vec!["p.toml:2: defaults.max_connections: expected a number >= 1, got 0"]
    );
    let e = errors(
        "[[rules]]\naction = \"allow\"\n\n[[rules]]\ndest = [\"a..b\"]\naction = \"deny\"\n",
    );
    assert!(e[0].starts_with("p.toml:5: rules[2].dest: "), "{}", e[0]);
    let e = errors("[[rules]]\ngroups = [\"nobody\"]\naction = \"deny\"\n");
    assert!(e[0].contains("rules[1].groups"), "{}", e[0]);
    let e = errors("[[rules]]\naction = \"via:corp\"\n");
    assert!(e[0].contains("no [upstreams.corp]"), "{}", e[0]);
    let e = errors("this is not toml");
    assert!(e[0].starts_with("p.toml:1: "), "{}", e[0]);
}

#[test]
fn rates_and_quotas() {
    let (_, p) = load("[defaults]\nrate_up = \"1MiB/s\"\nquota_period = \"30d\"\n[users.bob]\nrate_down = \"2MiB/s\"\nquota = \"100MiB\"\nburst = \"64KiB\"\n").unwrap();
    let r = p.rates(Some("bob"));
    assert_eq!(
        (r.down, r.up, r.burst),
        (Some(2 << 20), Some(1 << 20), Some(64 << 10))
    );
    assert_eq!(p.rates(None).up, Some(1 << 20));
    assert_eq!(
        p.quota(Some("bob")),
        Some(QuotaSpec {
            bytes: 100 << 20,
            period: Some(std::time::Duration::from_secs(30 * 86400))
        })
    );
    assert_eq!(p.quota(None), None);
    assert!(p.has_quotas());
    let e = errors(
        "[users.bob]\nrate_down = \"2 parsecs\"\nquota = \"100\"\nquota_period = \"500ms\"\n",
    );
    assert_eq!(e.len(), 3, "{e:#?}");
    assert!(e[1].starts_with("p.toml:3: users.bob.quota: "), "{}", e[1]);
    assert!(
        e[2].starts_with("p.toml:4: users.bob.quota_period: "),
        "{}",
        e[2]
    );
    let e = errors("[defaults]\nquota = \"1GB\"\nquota_perod = \"1d\"\n");
    assert!(e[0].contains("quota_perod"), "{}", e[0]);
}

#[test]
fn via_rules_route_through_their_group() {
    let text = format!(
        "{EXAMPLE}\n[upstreams.aaa]\nservers = [\"socks5://127.0.0.1:9\"]\nmax_fails = 5\nfail_timeout = \"1s\"\n\n[[rules]]\nusers = [\"bob\"]\ndest = [\"*.via.test\", \"192.0.2.0/24\"]\naction = \"via:corp\"\n"
    );
    let (_, p) = load(&text).unwrap();
    let lo: IpAddr = "127.0.0.1".parse().unwrap();
    let name = |n: &str| {
        crate::proto::TargetAddr::Domain(crate::proto::Name::new(n.as_bytes()).unwrap(), 443)
    };
    let route = |user, t: &crate::proto::TargetAddr| {
        p.route(Some(user), lo, Command::Connect, t)
            .map(|g| g.name.clone())
    };
    assert_eq!(route("bob", &name("x.via.test")), Some("corp".to_string()));
    assert_eq!(route("bob", &name("X.Via.Test.")), Some("corp".to_string()));
    assert_eq!(route("alice", &name("x.via.test")), None);
    assert_eq!(route("bob", &name("via.test")), None);
    let ip = crate::proto::TargetAddr::Ip("192.0.2.7:443".parse().unwrap());
    assert_eq!(route("bob", &ip), Some("corp".to_string()));
    assert_eq!(p.groups().len(), 2);
    assert_eq!(p.groups()[0].max_fails, 5);
    // A datagram a via rule covers is refused (groups carry TCP only); a TCP session is let through.
    let a: SocketAddr = "192.0.2.7:53".parse().unwrap();
    assert!(!p.allows_addr(Some("bob"), lo, Command::Udp, None, a));
    assert!(p.allows_addr(Some("bob"), lo, Command::Connect, None, a));
    let e = errors("[upstreams.u]\nservers = [\"socks5://127.0.0.1:1\"]\nmax_fails = 0\nfail_timeout = \"soon\"\n");
    assert!(e[0].contains("upstreams.u.max_fails"), "{}", e[0]);
    assert!(e[1].contains("upstreams.u.fail_timeout"), "{}", e[1]);
}

#[test]
fn session_usernames() {
    let (users, _) = load("[defaults]\nsession_usernames = true\n").unwrap();
    let a = users.verify(b"bob-session-42", b"pw").unwrap();
    assert_eq!((a.user(), a.session()), ("bob", Some("42")));
    assert_eq!(users.verify(b"bob", b"pw").unwrap().session(), None);
    for bad in [
        &b"bob-session-"[..],
        b"bob-session-a b",
        b"carl-session-1",
        b"bob-sessio-1",
    ] {
        assert!(users.verify(bad, b"pw").is_none(), "{bad:?}");
    }
    assert!(users.verify(b"bob-session-1", b"wrong").is_none());
    let (users, _) = load("[defaults]\nsession_usernames = false\n").unwrap();
    assert!(users.verify(b"bob-session-42", b"pw").is_none());
    // Sticky: the same user and session give the same address, others spread over the block.
    let list = [parse_egress("127.0.1.0/24").unwrap()];
    let one = pick_sticky_egress(&list, true, "bob", "42");
    assert_eq!(one, pick_sticky_egress(&list, true, "bob", "42"));
    let spread: std::collections::HashSet<_> = (0..50)
        .map(|i| pick_sticky_egress(&list, true, "bob", &i.to_string()))
        .collect();
    assert!(spread.len() > 20, "{}", spread.len());
}

#[test]
fn egress_picks() {
    let list = [
        parse_egress("127.0.1.0/24").unwrap(),
        parse_egress("2001:db8::/64").unwrap(),
    ];
    for _ in 0..200 {
        let (ip, free) = pick_egress(&list, true).unwrap();
        let IpAddr::V4(v4) = ip else { panic!("{ip}") };
        let o = v4.octets();
        assert_eq!(&o[..3], &[127, 0, 1]);
        assert!(o[3] != 0 && o[3] != 255, "{ip}");
        assert!(free);
        let (ip, _) = pick_egress(&list, false).unwrap();
        assert!(ip.to_string().starts_with("2001:db8::"), "{ip}");
    }
    assert_eq!(
        pick_egress(&[Egress::Ip("127.0.0.2".parse().unwrap())], true),
        Some(("127.0.0.2".parse().unwrap(), false))
    );
    assert_eq!(
        pick_egress(&[Egress::Ip("127.0.0.2".parse().unwrap())], false),
        None
    );
    assert!(parse_egress("127.0.0.1/31").is_err());
    assert!(parse_egress("0.0.0.0").is_err());
    assert!(parse_egress("nonsense").is_err());
}

#[test]
fn passwords_never_in_errors() {
    let e = errors("[users.bob]\npassword = \"hunter2\"\n");
    assert!(!e[0].contains("hunter2"), "{}", e[0]);
    let e = errors("[users.carol]\npassword = \"$1$hunter2$\"\n");
    assert!(!e[0].contains("hunter2"), "{}", e[0]);
    let e = errors("[users.carol]\npassword = \"hunter2\" x\n");
    assert!(!e[0].contains("hunter2"), "{}", e[0]);
    let e = errors("[upstreams.u]\nservers = [\"socks5://u:hunter2@127.0.0.1\"]\n");
    assert!(!e[0].contains("hunter2"), "{}", e[0]);
}

#[test]
fn tls_group_members_get_a_client_configuration() {
    let text =
        "[upstreams.u]\nservers = [\"socks5s://127.0.0.1:1081\", \"https://127.0.0.1:3128\", \
                \"socks5://127.0.0.1:1080\"]\ninsecure = true\n";
    let (_, policy) = load(text).unwrap();
    let g = &policy.groups[0];
    assert!(g.members[0].tls.is_some() && g.members[1].tls.is_some());
    assert!(g.members[2].tls.is_none());
    assert_eq!(g.members[0].label, "socks5s://127.0.0.1:1081");
    // https members offer http/1.1 by ALPN; socks5s members offer nothing.
    assert!(g.members[0].tls.as_ref().unwrap().alpn_protocols.is_empty());
    assert_eq!(
        g.members[1].tls.as_ref().unwrap().alpn_protocols,
        vec![b"http/1.1".to_vec()]
    );
}

#[test]
fn group_tls_keys_are_validated() {
    let e = errors(
        "[upstreams.u]\nservers = [\"https://127.0.0.1:1\"]\nca = \"/nonexistent/ca.pem\"\n",
    );
    assert!(
        e[0].starts_with("p.toml:3: upstreams.u.ca: ") && e[0].contains("/nonexistent/ca.pem"),
        "{}",
        e[0]
    );
    let e =
        errors("[upstreams.u]\nservers = [\"https://127.0.0.1:1\"]\nca = \"x\"\ninsecure = true\n");
    assert!(
        e[0].starts_with("p.toml:4: upstreams.u.insecure: "),
        "{}",
        e[0]
    );
    let e = errors("[upstreams.u]\nservers = [\"socks5://127.0.0.1:1\"]\ninsecure = true\n");
    assert!(
        e[0].starts_with("p.toml:3: upstreams.u.insecure: "),
        "{}",
        e[0]
    );
    let e = errors("[upstreams.u]\nservers = [\"https://127.0.0.1:1\"]\ninsecure = \"yes\"\n");
    assert!(e[0].contains("insecure"), "{}", e[0]);
}
