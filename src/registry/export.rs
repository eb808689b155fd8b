//! `/metrics`: the registry's gauges (devices, models, batches, routes)
//! brought up to date, then everything rendered.

use super::{ModelState, Registry};
use crate::metrics::{gauge_value, Metrics};

impl Registry {
    /// The metrics, with the registry's gauges brought up to date.
    pub fn render_metrics(&self) -> String {
        self.export_routes();
        let m = &self.metrics;
        let status = self.status();
        for d in &status.devices {
            let label = crate::metrics::DeviceLabel {
                device: d.name.clone(),
            };
            m.device_budget
                .get_or_create(&label)
                .set(gauge_value(d.budget));
            m.device_used.get_or_create(&label).set(gauge_value(d.used));
        }
        let mut resident = 0;
        for s in &status.models {
            let label = Metrics::model(&s.id);
            let st = &s.state;
            resident += i64::from(st.state.is_resident());
            for state in ModelState::ALL {
                let label = crate::metrics::ModelStateLabels {
                    model: s.id.clone(),
                    state: state.as_str().to_string(),
                };
                m.model_state
                    .get_or_create(&label)
                    .set(i64::from(state == st.state));
            }
            m.model_estimated
                .get_or_create(&label)
                .set(gauge_value(st.estimated_bytes.unwrap_or(0)));
            m.model_measured
                .get_or_create(&label)
                .set(gauge_value(st.measured_bytes.unwrap_or(0)));
            m.queue_depth
                .get_or_create(&label)
                .set(st.queue_depth as i64);
            m.in_flight.get_or_create(&label).set(st.in_flight as i64);
            let b = &st.batch;
            m.batch_running.get_or_create(&label).set(b.running as i64);
            m.batch_steps
                .get_or_create(&label)
                .set(gauge_value(b.steps));
            m.kv_blocks_used
                .get_or_create(&label)
                .set(b.kv_blocks_used as i64);
            m.kv_blocks_total
                .get_or_create(&label)
                .set(b.kv_blocks_total as i64);
            m.tokens_per_second
                .get_or_create(&label)
                .set(b.tokens_per_second);
            m.prefix_cached_blocks
                .get_or_create(&label)
                .set(b.prefix_cached_blocks as i64);
            let rate = if b.prefix_queries == 0 {
                0.0
            } else {
                b.prefix_hits as f64 / b.prefix_queries as f64
            };
            m.prefix_hit_rate.get_or_create(&label).set(rate);
            let (drafted, accepted) = b.drafts;
            m.spec_drafted
                .get_or_create(&label)
                .set(gauge_value(drafted));
            m.spec_accepted
                .get_or_create(&label)
                .set(gauge_value(accepted));
            let rate = if drafted == 0 {
                0.0
            } else {
                accepted as f64 / drafted as f64
            };
            m.spec_acceptance_rate.get_or_create(&label).set(rate);
            let name = Metrics::model_name(&s.id);
            m.vllm_waiting.get_or_create(&name).set(b.waiting as i64);
            m.vllm_running.get_or_create(&name).set(b.running as i64);
            let usage = if b.kv_blocks_total == 0 {
                0.0
            } else {
                b.kv_blocks_used as f64 / b.kv_blocks_total as f64
            };
            m.vllm_kv_usage.get_or_create(&name).set(usage);
            m.vllm_prefix_queries
                .get_or_create(&name)
                .set(gauge_value(b.prefix_queries));
            m.vllm_prefix_hits
                .get_or_create(&name)
                .set(gauge_value(b.prefix_hits));
            m.vllm_spec_drafted
                .get_or_create(&name)
                .set(gauge_value(drafted));
            m.vllm_spec_accepted
                .get_or_create(&name)
                .set(gauge_value(accepted));
        }
        m.resident_models.set(resident);
        m.process_resident
            .set(gauge_value(status.process_resident_bytes.unwrap_or(0)));
        m.render()
    }
}
