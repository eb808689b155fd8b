//! The process environment: the variables Kindling honours, read once.

/// Values taken from the process environment.
#[derive(Debug, Clone, Default)]
pub struct Environment {
    /// `PORT`, as set by Knative and most container platforms.
    pub port: Option<String>,
    /// `RUST_LOG`, the log filter.
    pub rust_log: Option<String>,
    /// `HF_TOKEN`, for Hugging Face downloads.
    pub hf_token: Option<String>,
    /// `KINDLING_API_KEY`: full-access keys, comma-separated.
    pub api_keys: Vec<String>,
    /// `KINDLING_STORE`: the model store (wins over `[models] store`; the
    /// same variable tells `scripts/fetch-models.sh` where to put models).
    pub store: Option<std::path::PathBuf>,
    /// `KINDLING_USAGE_DATABASE_URL`: the usage store's PostgreSQL URL
    /// (wins over `[usage] database_url`; a URL with a password belongs in
    /// a secret, not in the config file).
    pub usage_database_url: Option<String>,
    /// Where this replica runs, as constant labels for `/metrics`:
    /// Knative's `K_SERVICE` and `K_REVISION` (as `service_name` and
    /// `revision_name`, the names Knative's own metrics use) and the pod's
    /// name (`POD_NAME` from the downward API, else `HOSTNAME` inside
    /// Kubernetes) as `pod_name`.
    pub platform_labels: Vec<(String, String)>,
}

fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

impl Environment {
    /// Reads the variables Kindling honours.
    pub fn from_process() -> Self {
        Self {
            port: var("PORT"),
            rust_log: var("RUST_LOG"),
            hf_token: var("HF_TOKEN"),
            api_keys: var("KINDLING_API_KEY")
                .map(|v| {
                    v.split(',')
                        .map(str::trim)
                        .filter(|k| !k.is_empty())
                        .map(str::to_string)
                        .collect()
                })
                .unwrap_or_default(),
            store: var("KINDLING_STORE").map(std::path::PathBuf::from),
            usage_database_url: var("KINDLING_USAGE_DATABASE_URL"),
            platform_labels: platform_labels(var),
        }
    }
}

/// The constant labels for where this replica runs, from `get` (the
/// environment).
pub fn platform_labels(get: impl Fn(&str) -> Option<String>) -> Vec<(String, String)> {
    let in_cluster = get("K_SERVICE").is_some() || get("KUBERNETES_SERVICE_HOST").is_some();
    let pod = get("POD_NAME").or_else(|| in_cluster.then(|| get("HOSTNAME")).flatten());
    [
        ("service_name", get("K_SERVICE")),
        ("revision_name", get("K_REVISION")),
        ("pod_name", pod),
    ]
    .into_iter()
    .filter_map(|(k, v)| v.map(|v| (k.to_string(), v)))
    .collect()
}

#[cfg(test)]
mod tests {
    use super::platform_labels;

    #[test]
    fn labels_name_the_knative_service_revision_and_pod() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                vars.iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert!(platform_labels(env(&[("HOSTNAME", "laptop")])).is_empty());
        let labels = platform_labels(env(&[
            ("K_SERVICE", "kindling"),
            ("K_REVISION", "kindling-00002"),
            ("HOSTNAME", "kindling-00002-deployment-7f9c"),
        ]));
        let names: Vec<_> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        assert_eq!(
            names,
            [
                "service_name=kindling",
                "revision_name=kindling-00002",
                "pod_name=kindling-00002-deployment-7f9c"
            ]
        );
        let labels = platform_labels(env(&[("POD_NAME", "p-1"), ("HOSTNAME", "h")]));
        assert_eq!(labels, [("pod_name".to_string(), "p-1".to_string())]);
    }
}
