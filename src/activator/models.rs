//! The model ids that functions with an `[openai]` section serve: an index from id to
//! function, rebuilt whenever the set of revisions changes (deploy, removal, restore), so
//! the front door finds a model's function with one map lookup instead of visiting every
//! function on each request, and a deploy checks its claims against it.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use super::{Activator, ActivatorError, Function};
use crate::manifest::Manifest;

/// Model id → (function, the name the function's server knows the model by).
#[derive(Default)]
pub(super) struct ModelIndex(RwLock<HashMap<String, (String, String)>>);

impl Activator {
    /// The function serving model `id`, and the name its server knows the model by.
    pub fn model(&self, id: &str) -> Option<(Arc<Function>, String)> {
        let (function, upstream) = self
            .inner
            .models
            .0
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()?;
        Some((self.function(&function)?, upstream))
    }

    /// Rebuilds the index from the functions' current revisions.
    pub(super) fn reindex_models(&self) {
        let mut index = HashMap::new();
        for f in self.functions() {
            if let Some(openai) = &f.revision().manifest.openai {
                for (id, upstream) in openai.models.pairs() {
                    index.insert(id.to_string(), (f.name().to_string(), upstream.to_string()));
                }
            }
        }
        *self
            .inner
            .models
            .0
            .write()
            .unwrap_or_else(|e| e.into_inner()) = index;
    }

    /// Refuses a manifest claiming a model id another function serves.
    pub(super) fn check_model_claims(&self, manifest: &Manifest) -> Result<(), ActivatorError> {
        let Some(openai) = &manifest.openai else {
            return Ok(());
        };
        let index = self
            .inner
            .models
            .0
            .read()
            .unwrap_or_else(|e| e.into_inner());
        for (i, (model, _)) in openai.models.pairs().into_iter().enumerate() {
            match index.get(model) {
                Some((holder, _)) if *holder != manifest.name => {
                    return Err(ActivatorError::ModelClaimed {
                        field: openai.models.field(i),
                        model: model.to_string(),
                        function: holder.clone(),
                    })
                }
                _ => {}
            }
        }
        Ok(())
    }
}
