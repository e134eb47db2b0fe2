//! The node classes the stub knows: the eight of ComfyUI's default text-to-image and
//! image-loading graphs, with their inputs as ComfyUI's `INPUT_TYPES` declares them, their
//! outputs, and `/object_info`, which describes them as ComfyUI does. What the nodes do
//! is in `exec.rs`; how their inputs are checked is in `graph.rs`.

use crate::files::Dirs;
use crate::json::quote;
use crate::str_list;

/// What an input takes.
pub enum Kind {
    /// A link from an output of this type (`MODEL`, `LATENT`…), or a widget value for
    /// `INT`, `FLOAT` and `STRING`.
    Type(&'static str),
    /// One of [`CHECKPOINTS`] (not enforced: any name loads the same stub model).
    Checkpoints,
    /// One of [`SAMPLERS`].
    Samplers,
    /// One of [`SCHEDULERS`].
    Schedulers,
    /// A file in `input/` (LoadImage; checked by its own validation, as in ComfyUI).
    InputImages,
}

/// One required input of a class.
pub struct Input {
    pub name: &'static str,
    pub kind: Kind,
    /// Its options object as JSON (default, min, max, tooltip…); empty for none.
    pub options: &'static str,
    /// The `min` and `max` of an `INT` or `FLOAT`.
    pub range: Option<(f64, f64)>,
}

/// A node class.
pub struct Class {
    pub name: &'static str,
    pub display_name: &'static str,
    pub description: &'static str,
    pub category: &'static str,
    /// Output nodes are what a prompt executes; the rest run because they feed one.
    pub output_node: bool,
    pub inputs: &'static [Input],
    /// Whether it takes the hidden `prompt` and `extra_pnginfo` (the image savers).
    pub hidden: bool,
    pub outputs: &'static [&'static str],
    pub output_tooltips: &'static [&'static str],
}

/// The models `/models/checkpoints` lists.
pub const CHECKPOINTS: &[&str] = &["stub.safetensors"];

/// ComfyUI's sampler names (`comfy.samplers.KSampler.SAMPLERS`).
pub const SAMPLERS: &[&str] = &[
    "euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2", "dpm_2",
    "dpm_2_ancestral", "lms", "dpm_fast", "dpm_adaptive", "dpmpp_2s_ancestral", "dpmpp_2s_ancestral_cfg_pp",
    "dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m", "dpmpp_2m_cfg_pp", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu",
    "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm", "lcm", "ipndm",
    "ipndm_v", "deis", "res_multistep", "res_multistep_cfg_pp", "res_multistep_ancestral",
    "res_multistep_ancestral_cfg_pp", "gradient_estimation", "gradient_estimation_cfg_pp", "er_sde", "seeds_2",
    "seeds_3", "sa_solver", "sa_solver_pece", "ddim", "uni_pc", "uni_pc_bh2",
];

/// ComfyUI's scheduler names (`comfy.samplers.KSampler.SCHEDULERS`).
pub const SCHEDULERS: &[&str] =
    &["simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal", "linear_quadratic", "kl_optimal"];

const fn input(name: &'static str, kind: Kind, options: &'static str) -> Input {
    Input { name, kind, options, range: None }
}

const fn number(name: &'static str, kind: &'static str, min: f64, max: f64, options: &'static str) -> Input {
    Input { name, kind: Kind::Type(kind), options, range: Some((min, max)) }
}

/// Every class the stub knows, in ComfyUI's order.
pub const CLASSES: &[Class] = &[
    Class {
        name: "KSampler",
        display_name: "KSampler",
        description: "Uses the provided model, positive and negative conditioning to denoise the latent image.",
        category: "sampling",
        output_node: false,
        inputs: &[
            input("model", Kind::Type("MODEL"), r#"{"tooltip": "The model used for denoising the input latent."}"#),
            number("seed", "INT", 0.0, 18446744073709551615.0, r#"{"default": 0, "min": 0, "max": 18446744073709551615, "control_after_generate": true, "tooltip": "The random seed used for creating the noise."}"#),
            number("steps", "INT", 1.0, 10000.0, r#"{"default": 20, "min": 1, "max": 10000, "tooltip": "The number of steps used in the denoising process."}"#),
            number("cfg", "FLOAT", 0.0, 100.0, r#"{"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01, "tooltip": "The Classifier-Free Guidance scale balances creativity and adherence to the prompt."}"#),
            input("sampler_name", Kind::Samplers, r#"{"tooltip": "The algorithm used when sampling, this can affect the quality, speed, and style of the generated output."}"#),
            input("scheduler", Kind::Schedulers, r#"{"tooltip": "The scheduler controls how noise is gradually removed to form the image."}"#),
            input("positive", Kind::Type("CONDITIONING"), r#"{"tooltip": "The conditioning describing the attributes you want to include in the image."}"#),
            input("negative", Kind::Type("CONDITIONING"), r#"{"tooltip": "The conditioning describing the attributes you want to exclude from the image."}"#),
            input("latent_image", Kind::Type("LATENT"), r#"{"tooltip": "The latent image to denoise."}"#),
            number("denoise", "FLOAT", 0.0, 1.0, r#"{"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": "The amount of denoising applied, lower values will maintain the structure of the initial image allowing for image to image sampling."}"#),
        ],
        hidden: false,
        outputs: &["LATENT"],
        output_tooltips: &["The denoised latent."],
    },
    Class {
        name: "CheckpointLoaderSimple",
        display_name: "Load Checkpoint",
        description: "Loads a diffusion model checkpoint, diffusion models are used to denoise latents.",
        category: "loaders",
        output_node: false,
        inputs: &[input("ckpt_name", Kind::Checkpoints, r#"{"tooltip": "The name of the checkpoint (model) to load."}"#)],
        hidden: false,
        outputs: &["MODEL", "CLIP", "VAE"],
        output_tooltips: &[
            "The model used for denoising latents.",
            "The CLIP model used for encoding text prompts.",
            "The VAE model used for encoding and decoding images to and from latent space.",
        ],
    },
    Class {
        name: "CLIPTextEncode",
        display_name: "CLIP Text Encode (Prompt)",
        description: "Encodes a text prompt using a CLIP model into an embedding that can be used to guide the diffusion model towards generating specific images.",
        category: "conditioning",
        output_node: false,
        inputs: &[
            input("text", Kind::Type("STRING"), r#"{"multiline": true, "dynamicPrompts": true, "tooltip": "The text to be encoded."}"#),
            input("clip", Kind::Type("CLIP"), r#"{"tooltip": "The CLIP model used for encoding the text."}"#),
        ],
        hidden: false,
        outputs: &["CONDITIONING"],
        output_tooltips: &["A conditioning containing the embedded text used to guide the diffusion model."],
    },
    Class {
        name: "VAEDecode",
        display_name: "VAE Decode",
        description: "Decodes latent images back into pixel space images.",
        category: "latent",
        output_node: false,
        inputs: &[
            input("samples", Kind::Type("LATENT"), r#"{"tooltip": "The latent to be decoded."}"#),
            input("vae", Kind::Type("VAE"), r#"{"tooltip": "The VAE model used for decoding the latent."}"#),
        ],
        hidden: false,
        outputs: &["IMAGE"],
        output_tooltips: &["The decoded image."],
    },
    Class {
        name: "EmptyLatentImage",
        display_name: "Empty Latent Image",
        description: "Create a new batch of empty latent images to be denoised via sampling.",
        category: "latent",
        output_node: false,
        inputs: &[
            number("width", "INT", 16.0, 16384.0, r#"{"default": 512, "min": 16, "max": 16384, "step": 8, "tooltip": "The width of the latent images in pixels."}"#),
            number("height", "INT", 16.0, 16384.0, r#"{"default": 512, "min": 16, "max": 16384, "step": 8, "tooltip": "The height of the latent images in pixels."}"#),
            number("batch_size", "INT", 1.0, 4096.0, r#"{"default": 1, "min": 1, "max": 4096, "tooltip": "The number of latent images in the batch."}"#),
        ],
        hidden: false,
        outputs: &["LATENT"],
        output_tooltips: &["The empty latent image batch."],
    },
    Class {
        name: "SaveImage",
        display_name: "Save Image",
        description: "Saves the input images to your ComfyUI output directory.",
        category: "image",
        output_node: true,
        inputs: &[
            input("images", Kind::Type("IMAGE"), r#"{"tooltip": "The images to save."}"#),
            input("filename_prefix", Kind::Type("STRING"), r#"{"default": "ComfyUI", "tooltip": "The prefix for the file to save. This may include formatting information such as %date:yyyy-MM-dd% or %Empty Latent Image.width% to include values from nodes."}"#),
        ],
        hidden: true,
        outputs: &[],
        output_tooltips: &[],
    },
    Class {
        name: "PreviewImage",
        display_name: "Preview Image",
        description: "Saves the input images to your ComfyUI output directory.",
        category: "image",
        output_node: true,
        inputs: &[input("images", Kind::Type("IMAGE"), "")],
        hidden: true,
        outputs: &[],
        output_tooltips: &[],
    },
    Class {
        name: "LoadImage",
        display_name: "Load Image",
        description: "",
        category: "image",
        output_node: false,
        inputs: &[input("image", Kind::InputImages, r#"{"image_upload": true}"#)],
        hidden: false,
        outputs: &["IMAGE", "MASK"],
        output_tooltips: &[],
    },
];

/// The class called `name`.
pub fn class(name: &str) -> Option<&'static Class> {
    CLASSES.iter().find(|c| c.name == name)
}

/// `/object_info` (every class) or `/object_info/CLASS` (`only`; `{}` when unknown).
pub fn object_info(dirs: &Dirs, only: Option<&str>) -> String {
    let described: Vec<String> = CLASSES
        .iter()
        .filter(|c| only.is_none_or(|name| name == c.name))
        .map(|c| format!("{}:{}", quote(c.name), describe(c, dirs)))
        .collect();
    format!("{{{}}}", described.join(","))
}

/// One class as ComfyUI's `node_info` describes it.
fn describe(c: &Class, dirs: &Dirs) -> String {
    let required: Vec<String> = c
        .inputs
        .iter()
        .map(|i| {
            let kind = match &i.kind {
                Kind::Type(t) => quote(t),
                Kind::Checkpoints => str_list(CHECKPOINTS),
                Kind::Samplers => str_list(SAMPLERS),
                Kind::Schedulers => str_list(SCHEDULERS),
                Kind::InputImages => str_list(&dirs.input_images()),
            };
            let spec = if i.options.is_empty() { format!("[{kind}]") } else { format!("[{kind},{}]", i.options) };
            format!("{}:{spec}", quote(i.name))
        })
        .collect();
    let names: Vec<&str> = c.inputs.iter().map(|i| i.name).collect();
    let (hidden, hidden_order) = if c.hidden {
        (r#","hidden":{"prompt":"PROMPT","extra_pnginfo":"EXTRA_PNGINFO"}"#, r#","hidden":["prompt","extra_pnginfo"]"#)
    } else {
        ("", "")
    };
    let tooltips = if c.output_tooltips.is_empty() {
        String::new()
    } else {
        format!(r#","output_tooltips":{}"#, str_list(c.output_tooltips))
    };
    format!(
        concat!(
            r#"{{"input":{{"required":{{{}}}{}}},"input_order":{{"required":{}{}}},"output":{},"output_is_list":[{}],"#,
            r#""output_name":{},"name":{},"display_name":{},"description":{},"python_module":"nodes","#,
            r#""category":{},"output_node":{}{}}}"#
        ),
        required.join(","),
        hidden,
        str_list(&names),
        hidden_order,
        str_list(c.outputs),
        vec!["false"; c.outputs.len()].join(","),
        str_list(c.outputs),
        quote(c.name),
        quote(c.display_name),
        quote(c.description),
        quote(c.category),
        c.output_node,
        tooltips
    )
}
