use super::*;

fn versions() -> Vec<String> {
    vec!["v1".into(), "v2".into()]
}

fn spec(json: &str) -> RouteSpec {
    serde_json::from_str(json).unwrap()
}

fn routes(file: Option<PathBuf>) -> Routes {
    Routes::new(BTreeMap::new(), file, Arc::new(Metrics::new()))
}

#[test]
fn default_route_set_promote_rollback_reset_and_saved_history() {
    let dir = std::env::temp_dir().join(format!("kindling-routes-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let file = dir.join("routes.json");
    let r = routes(Some(file.clone()));
    let vs = versions();
    // No route: everything to the newest.
    assert_eq!(r.choose("m", &vs, Some("u")).unwrap().version, "v2");
    assert_eq!(r.view("m", &vs).origin, "default");
    let e = r
        .set("m", &vs, spec(r#"{"weights":{"v1":90,"v9":10}}"#), "ops")
        .unwrap_err();
    assert!(e.to_string().contains("no version `v9`"), "{e}");
    let v = r
        .set("m", &vs, spec(r#"{"weights":{"v1":90,"v2":10}}"#), "ops")
        .unwrap();
    assert_eq!((v.origin, v.weights["v1"]), ("admin", 90.0));
    let v = r.promote("m", &vs, None, "ops").unwrap();
    assert_eq!((v.weights["v1"], v.weights["v2"]), (0.0, 100.0));
    let v = r.rollback("m", &vs, "ops").unwrap();
    assert_eq!(v.weights["v2"], 10.0);
    let v = r.rollback("m", &vs, "ops").unwrap();
    assert_eq!(v.origin, "default");
    assert!(
        r.rollback("m", &vs, "ops").is_err(),
        "nothing left to roll back to"
    );
    r.set("m", &vs, spec(r#"{"weights":{"v1":100}}"#), "ops")
        .unwrap();
    let v = r.reset("m", &vs, "ops");
    assert_eq!((v.origin, v.weights.get("v2")), ("default", Some(&100.0)));
    // The default follows the newest version as versions come.
    let more = ["v1".to_string(), "v2".to_string(), "v3".to_string()];
    assert_eq!(r.choose("m", &more, Some("u")).unwrap().version, "v3");
    let actions: Vec<String> = r.history(Some("m")).into_iter().map(|c| c.action).collect();
    assert_eq!(
        actions,
        ["set", "promote", "rollback", "rollback", "set", "reset"]
    );
    // A restart finds the route and the history.
    let again = routes(Some(file.clone()));
    assert_eq!(again.history(None), r.history(None));
    assert_eq!(again.view("m", &vs).weights, v.weights);
    // A corrupt file is set aside; the daemon starts with the config's routes.
    std::fs::write(&file, "{not json").unwrap();
    let fresh = routes(Some(file.clone()));
    assert!(fresh.history(None).is_empty());
    assert!(dir.join("routes.json.bad").exists());
}

#[test]
fn the_guard_rolls_a_failing_canary_back_to_the_baseline() {
    let r = routes(None);
    let vs = versions();
    r.set(
        "m",
        &vs,
        spec(r#"{"weights":{"v1":80,"v2":20},"guard":{"max_error_rate_increase":0.2,"min_requests":5}}"#),
        "ops",
    )
    .unwrap();
    let ok = Outcome {
        latency: Duration::from_millis(10),
        ..Outcome::default()
    };
    let bad = Outcome {
        error: true,
        ..ok.clone()
    };
    for _ in 0..10 {
        r.observe("m", "v1", &vs, Traffic::Primary, &ok);
    }
    for _ in 0..4 {
        r.observe("m", "v2", &vs, Traffic::Primary, &bad);
    }
    assert_eq!(
        r.view("m", &vs).weights["v2"],
        20.0,
        "four requests are too few to judge"
    );
    let c = r.compare("m", &vs, None);
    assert_eq!(c.baseline.version, "v1");
    assert_eq!(c.candidates[0].figures.errors, 4);
    // Shadow and client errors are never held against a version.
    let client = Outcome {
        client_error: true,
        ..ok.clone()
    };
    r.observe("m", "v2", &vs, Traffic::Primary, &client);
    r.observe("m", "v2", &vs, Traffic::Shadow, &bad);
    assert_eq!(r.view("m", &vs).weights["v2"], 20.0);
    r.observe("m", "v2", &vs, Traffic::Primary, &bad);
    let v = r.view("m", &vs);
    assert_eq!((v.weights["v1"], v.weights["v2"]), (100.0, 0.0));
    let last = r.history(Some("m")).pop().unwrap();
    assert_eq!(
        (last.actor.as_str(), last.action.as_str()),
        ("guard", "guard_rollback")
    );
    assert!(last.reason.unwrap().contains("error rate 100.0%"));
    assert!(r
        .metrics
        .render()
        .contains("kindling_route_rollbacks_total{model=\"m\",trigger=\"guard\"} 1"));
    // The operator can undo the guard's rollback.
    assert_eq!(r.rollback("m", &vs, "ops").unwrap().weights["v2"], 20.0);
}

#[test]
fn shadow_copies_go_to_a_different_version_only() {
    let r = routes(None);
    let vs = versions();
    r.set(
        "m",
        &vs,
        spec(r#"{"weights":{"v1":100},"shadow":{"version":"v2"}}"#),
        "ops",
    )
    .unwrap();
    let c = r.choose("m", &vs, None).unwrap();
    assert_eq!(
        c,
        Choice {
            version: "v1".into(),
            shadow: Some("v2".into())
        }
    );
    r.set(
        "m",
        &vs,
        spec(r#"{"weights":{"v2":100},"shadow":{"version":"v2"}}"#),
        "ops",
    )
    .unwrap();
    assert_eq!(r.choose("m", &vs, None).unwrap().shadow, None);
}

#[test]
fn config_routes_follow_the_config_file_and_run_time_changes_win_until_reset() {
    let dir = std::env::temp_dir().join(format!("kindling-routes-cfg-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let file = dir.join("routes.json");
    let vs = versions();
    let with = |json: &str| {
        let config = BTreeMap::from([("m".to_string(), spec(json))]);
        Routes::new(config, Some(file.clone()), Arc::new(Metrics::new()))
    };
    let r = with(r#"{"weights":{"v1":100}}"#);
    assert_eq!(r.view("m", &vs).origin, "config");
    // A change to another id saves the file; m's config route is not frozen in it.
    r.set("n", &vs, spec(r#"{"weights":{"v2":100}}"#), "ops")
        .unwrap();
    let r = with(r#"{"weights":{"v1":50,"v2":50}}"#);
    assert_eq!(r.view("m", &vs).weights["v2"], 50.0);
    assert_eq!(r.view("n", &vs).weights["v2"], 100.0);
    // Set at run time, m keeps its route over the config's across restarts.
    r.set("m", &vs, spec(r#"{"weights":{"v1":10,"v2":90}}"#), "ops")
        .unwrap();
    let r = with(r#"{"weights":{"v1":50,"v2":50}}"#);
    assert_eq!(
        (r.view("m", &vs).origin, r.view("m", &vs).weights["v2"]),
        ("admin", 90.0)
    );
    // Reset puts the config's back, and can be rolled back.
    assert_eq!(r.reset("m", &vs, "ops").weights["v2"], 50.0);
    assert_eq!(r.rollback("m", &vs, "ops").unwrap().weights["v2"], 90.0);
}

#[test]
fn the_guard_judges_live_versions_and_promote_drops_missing_ones() {
    let r = routes(None);
    let three = vec!["v1".to_string(), "v2".to_string(), "v3".to_string()];
    r.set(
        "m",
        &three,
        spec(r#"{"weights":{"v1":80,"v2":10,"v3":10},"shadow":{"version":"v1"},"guard":{"max_error_rate_increase":0.2,"min_requests":3}}"#),
        "ops",
    )
    .unwrap();
    // v1's manifest is gone: v2 and v3 share its traffic, v2 (the older of
    // the two equal shares) is the baseline, and v3 the canary judged.
    let live = vec!["v2".to_string(), "v3".to_string()];
    let ok = Outcome {
        latency: Duration::from_millis(5),
        ..Outcome::default()
    };
    let bad = Outcome {
        error: true,
        ..ok.clone()
    };
    for _ in 0..5 {
        r.observe("m", "v2", &live, Traffic::Primary, &bad);
    }
    assert_eq!(
        r.view("m", &live).weights["v2"],
        10.0,
        "the baseline is never rolled back"
    );
    for _ in 0..3 {
        r.observe("m", "v3", &live, Traffic::Primary, &ok);
    }
    assert_eq!(
        r.view("m", &live).weights["v3"],
        10.0,
        "v3 does better than the baseline"
    );
    // Promoting v3 leaves the missing v1 (and the shadow on it) out.
    let v = r.promote("m", &live, Some("v3".into()), "ops").unwrap();
    assert_eq!(
        v.weights,
        BTreeMap::from([("v2".to_string(), 0.0), ("v3".to_string(), 100.0)])
    );
    assert_eq!(v.shadow, None);
}
