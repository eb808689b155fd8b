//! Where a model is in its lifecycle, as the API, `/admin/status` and the
//! metrics name it.

/// Where a model is in its lifecycle, as users see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelState {
    /// Not in memory; the next request loads it.
    Cold,
    /// Its weights are being fetched.
    Downloading,
    /// Its weights are being loaded.
    Loading,
    /// In memory, serving nothing right now.
    Warm,
    /// In memory, serving requests.
    Busy,
    /// Unloading once its requests end.
    Draining,
    /// The last load failed; a retry is held back for a while.
    Failed,
}

impl ModelState {
    /// Every state, in lifecycle order.
    pub const ALL: [Self; 7] = [
        Self::Cold,
        Self::Downloading,
        Self::Loading,
        Self::Warm,
        Self::Busy,
        Self::Draining,
        Self::Failed,
    ];

    /// The state's name in the API, the status page and the metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Cold => "cold",
            Self::Downloading => "downloading",
            Self::Loading => "loading",
            Self::Warm => "warm",
            Self::Busy => "busy",
            Self::Draining => "draining",
            Self::Failed => "failed",
        }
    }

    /// Whether its weights are in memory.
    pub fn is_resident(self) -> bool {
        matches!(self, Self::Warm | Self::Busy | Self::Draining)
    }
}

impl std::fmt::Display for ModelState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
