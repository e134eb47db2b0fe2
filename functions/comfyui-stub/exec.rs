//! The worker: one thread that takes prompts from the queue one at a time and "runs"
//! them, sending the messages ComfyUI's executor sends, in its order:
//!
//! `status` (to all, as the prompt leaves the queue), `execution_start`,
//! `execution_cached` (always no nodes: the stub caches nothing), then per node
//! `executing`; KSampler sleeps `STEP_MS` per step with `progress` and a binary preview
//! after each; each output node `executed` with its images; then `execution_success`, or
//! `execution_interrupted` or `execution_error`. The history entry is recorded, `status`
//! goes to all, and last `executing` with node `null`.
//!
//! As in ComfyUI, messages go to the prompt's `client_id`; without one, `progress`,
//! previews and `execution_interrupted` go to every socket and the rest to nobody.

use std::collections::HashMap;
use std::fs;
use std::thread;

use crate::graph::{self, input, link};
use crate::json::{quote, Json};
use crate::queue::Task;
use crate::socket::To;
use crate::{files, mix64, now_ms, png, random_u64, str_list, to_json, Server};

/// Most KSampler steps taken (ComfyUI allows 10000).
const MAX_STEPS: u32 = 1000;
/// Most images a batch saves.
const MAX_BATCH: u32 = 64;
/// Side of the previews sent while sampling, at most.
const PREVIEW_SIDE: u32 = 64;
/// `BinaryEventTypes.PREVIEW_IMAGE`, and the format number for PNG.
const PREVIEW_IMAGE: u32 = 1;
const FORMAT_PNG: u32 = 2;

/// Runs prompts, one at a time, for ever.
pub fn worker(server: &Server) {
    loop {
        let (task, remaining) = server.queue.take();
        server.sockets.status(remaining);
        let client = task.client_id();
        let mut run = Run::new(server, &task, client.as_deref());
        let outcome = run.execute();
        let entry = run.history_entry(outcome);
        let remaining = server.queue.finish(&task.id, entry);
        server.sockets.status(remaining);
        if let Some(client) = client.as_deref() {
            let data = format!(r#"{{"node":null,"prompt_id":{}}}"#, quote(&task.id));
            server.sockets.send("executing", &data, To::Client(client));
        }
    }
}

/// What an image-carrying output of a node holds: enough to draw its pictures.
#[derive(Clone, Copy)]
struct Pixels {
    width: u32,
    height: u32,
    batch: u32,
    seed: u64,
}

/// What a node given no image works with.
const DEFAULT_PIXELS: Pixels = Pixels { width: 64, height: 64, batch: 1, seed: 0 };

/// The stub's image side for a size in pixels: an eighth (the latent's), within 8..=256.
fn side(pixels: f64) -> u32 {
    (pixels / 8.0).clamp(8.0, 256.0) as u32
}

/// Why a prompt stopped early.
enum Stop {
    Interrupted,
    /// An exception's type and message, as ComfyUI reports them.
    Failed(&'static str, String),
}

/// Whether a prompt ran to the end.
#[derive(Clone, Copy, PartialEq)]
enum Outcome {
    Success,
    Stopped,
}

/// One prompt being run.
struct Run<'a> {
    server: &'a Server,
    task: &'a Task,
    client: Option<&'a str>,
    /// The status messages kept in the history: event and data.
    messages: Vec<(&'static str, String)>,
    executed: Vec<String>,
    /// Output nodes' UI outputs (`{"images": [...]}`), by node.
    ui: Vec<(String, String)>,
    /// The pictures each node's outputs carry.
    pixels: HashMap<String, Pixels>,
}

impl<'a> Run<'a> {
    fn new(server: &'a Server, task: &'a Task, client: Option<&'a str>) -> Run<'a> {
        Run { server, task, client, messages: Vec::new(), executed: Vec::new(), ui: Vec::new(), pixels: HashMap::new() }
    }

    /// Sends to the prompt's client, or to all without one.
    fn send(&self, event: &str, data: &str) {
        self.server.sockets.send(event, data, To::client_or_all(self.client));
    }

    /// ComfyUI's `add_message`: kept for the history with a timestamp, and sent when the
    /// prompt has a client (or to all when `broadcast`). `fields` are the data's members.
    fn message(&mut self, event: &'static str, fields: &str, broadcast: bool) {
        let data = format!(r#"{{{fields},"timestamp":{}}}"#, now_ms());
        if self.client.is_some() || broadcast {
            self.send(event, &data);
        }
        self.messages.push((event, data));
    }

    fn execute(&mut self) -> Outcome {
        let task = self.task;
        let id = quote(&task.id);
        self.message("execution_start", &format!(r#""prompt_id":{id}"#), false);
        self.message("execution_cached", &format!(r#""nodes":[],"prompt_id":{id}"#), false);
        for node_id in graph::execution_order(&task.prompt, &task.outputs) {
            let node = task.prompt.get(&node_id).unwrap_or(&Json::Null);
            let class = graph::class_of(node).unwrap_or_default();
            let result = if self.server.queue.interrupted() { Err(Stop::Interrupted) } else { self.run_node(&node_id, node, class) };
            match result {
                Ok(()) => self.executed.push(node_id),
                Err(stop) => {
                    self.stopped(stop, &node_id, class);
                    return Outcome::Stopped;
                }
            }
        }
        self.message("execution_success", &format!(r#""prompt_id":{id}"#), false);
        Outcome::Success
    }

    /// Reports an interrupt (to all when the prompt has no client) or an error.
    fn stopped(&mut self, stop: Stop, node_id: &str, class: &str) {
        let common = format!(
            r#""prompt_id":{},"node_id":{},"node_type":{},"executed":{}"#,
            quote(&self.task.id),
            quote(node_id),
            quote(class),
            str_list(&self.executed)
        );
        match stop {
            Stop::Interrupted => self.message("execution_interrupted", &common, true),
            Stop::Failed(kind, message) => {
                let fields = format!(
                    r#"{common},"exception_message":{},"exception_type":{},"traceback":[],"current_inputs":{{}},"current_outputs":{}"#,
                    quote(&message),
                    quote(kind),
                    str_list(&self.executed)
                );
                self.message("execution_error", &fields, false);
            }
        }
    }

    fn run_node(&mut self, node_id: &str, node: &Json, class: &str) -> Result<(), Stop> {
        if self.client.is_some() {
            self.server.queue.set_node(Some(node_id));
            let data = format!(
                r#"{{"node":{0},"display_node":{0},"prompt_id":{1}}}"#,
                quote(node_id),
                quote(&self.task.id)
            );
            self.send("executing", &data);
        }
        let widget = |name: &str, default: f64| input(node, name).and_then(|v| graph::number(v, true)).unwrap_or(default);
        let made = match class {
            "EmptyLatentImage" => Some(Pixels {
                width: side(widget("width", 512.0)),
                height: side(widget("height", 512.0)),
                batch: widget("batch_size", 1.0).clamp(1.0, f64::from(MAX_BATCH)) as u32,
                seed: 0,
            }),
            "KSampler" => {
                let latent = self.linked(node, "latent_image");
                let seed = widget("seed", 0.0) as u64;
                let steps = widget("steps", 20.0).clamp(1.0, f64::from(MAX_STEPS)) as u32;
                let sampled = Pixels { seed: mix64(seed) ^ latent.seed, ..latent };
                self.sample(node_id, sampled, steps)?;
                Some(sampled)
            }
            "VAEDecode" => Some(self.linked(node, "samples")),
            "LoadImage" => Some(self.load(node)?),
            "SaveImage" | "PreviewImage" => {
                self.save(node_id, node, class == "SaveImage")?;
                None
            }
            _ => None,
        };
        if let Some(pixels) = made {
            self.pixels.insert(node_id.to_string(), pixels);
        }
        Ok(())
    }

    /// The pictures the node linked at input `name` made.
    fn linked(&self, node: &Json, name: &str) -> Pixels {
        input(node, name).and_then(link).and_then(|(id, _)| self.pixels.get(id)).copied().unwrap_or(DEFAULT_PIXELS)
    }

    /// KSampler's steps: a sleep each, then `progress` and a preview, to the prompt's
    /// client or to all. Stops at an interrupt.
    fn sample(&self, node_id: &str, pixels: Pixels, steps: u32) -> Result<(), Stop> {
        let (width, height) = (pixels.width.min(PREVIEW_SIDE), pixels.height.min(PREVIEW_SIDE));
        for step in 1..=steps {
            if self.server.queue.interrupted() {
                return Err(Stop::Interrupted);
            }
            thread::sleep(self.server.step);
            let progress = format!(
                r#"{{"value":{step},"max":{steps},"prompt_id":{},"node":{}}}"#,
                quote(&self.task.id),
                quote(node_id)
            );
            self.send("progress", &progress);
            let mut frame = PREVIEW_IMAGE.to_be_bytes().to_vec();
            frame.extend_from_slice(&FORMAT_PNG.to_be_bytes());
            let rgb = png::preview(pixels.seed, width, height, step, steps);
            frame.extend_from_slice(&png::encode(width, height, &rgb, &[]));
            self.server.sockets.send_binary(&frame, To::client_or_all(self.client));
        }
        Ok(())
    }

    /// LoadImage: the file's picture size (an eighth of a PNG's), seeded by its bytes.
    fn load(&self, node: &Json) -> Result<Pixels, Stop> {
        let name = input(node, "image").and_then(Json::as_str).unwrap_or_default();
        let bytes = self
            .server
            .dirs
            .annotated_file(name)
            .and_then(|path| fs::read(path).ok())
            .ok_or_else(|| Stop::Failed("FileNotFoundError", format!("No such file: '{name}'")))?;
        let (w, h) = png::dimensions(&bytes).unwrap_or((512, 512));
        let seed = bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
        Ok(Pixels { width: side(f64::from(w)), height: side(f64::from(h)), batch: 1, seed })
    }

    /// SaveImage (into `output/`) or PreviewImage (into `temp/`): one PNG per image of the
    /// batch, named as ComfyUI names them (`PREFIX_00001_.png`, counting on from the
    /// highest number already in the folder), with the prompt in their text chunks.
    fn save(&mut self, node_id: &str, node: &Json, keep: bool) -> Result<(), Stop> {
        let pixels = self.linked(node, "images");
        let dirs = &self.server.dirs;
        let (dir, kind, prefix) = if keep {
            let prefix = input(node, "filename_prefix").and_then(Json::as_str).unwrap_or("ComfyUI");
            (&dirs.output, "output", prefix.to_string())
        } else {
            let letters: String = (0..5).map(|_| b"abcdefghijklmnopqrstupvxyz"[(random_u64() % 26) as usize] as char).collect();
            (&dirs.temp, "temp", format!("ComfyUI_temp_{letters}"))
        };
        let prefix = prefix.replace("%width%", &(pixels.width * 8).to_string()).replace("%height%", &(pixels.height * 8).to_string());
        let outside = || {
            let message = format!(
                "**** ERROR: Saving image outside the output folder is not allowed.\n filename_prefix: {prefix}\n output_dir: {}",
                dir.display()
            );
            Stop::Failed("Exception", message)
        };
        let relative = files::normalize(&prefix).ok_or_else(outside)?;
        let base = relative.file_name().and_then(|n| n.to_str()).unwrap_or("ComfyUI").to_string();
        let subfolder = relative.parent().and_then(|p| p.to_str()).unwrap_or_default().to_string();
        let folder = dir.join(&subfolder);
        let io_error = |e: std::io::Error| Stop::Failed("OSError", e.to_string());
        fs::create_dir_all(&folder).map_err(io_error)?;
        let first = next_counter(&folder, &base);
        let mut text = vec![("prompt".to_string(), to_json(&self.task.prompt, true))];
        if let Some(Json::Obj(info)) = self.task.extra_data.get("extra_pnginfo") {
            let keyword_ok = |k: &str| (1..80).contains(&k.len()) && k.bytes().all(|b| (0x20..0x7f).contains(&b));
            text.extend(info.iter().filter(|(k, _)| keyword_ok(k)).map(|(k, v)| (k.clone(), to_json(v, true))));
        }
        let text: Vec<(&str, &str)> = text.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let mut images = Vec::new();
        for (b, counter) in (0..pixels.batch).zip(first..) {
            let file = format!("{}_{counter:05}_.png", base.replace("%batch_num%", &b.to_string()));
            let rgb = png::picture(pixels.seed ^ mix64(u64::from(b)), pixels.width, pixels.height);
            fs::write(folder.join(&file), png::encode(pixels.width, pixels.height, &rgb, &text)).map_err(io_error)?;
            images.push(format!(r#"{{"filename":{},"subfolder":{},"type":"{kind}"}}"#, quote(&file), quote(&subfolder)));
        }
        let output = format!(r#"{{"images":[{}]}}"#, images.join(","));
        if self.client.is_some() {
            let data = format!(
                r#"{{"node":{0},"display_node":{0},"output":{1},"prompt_id":{2}}}"#,
                quote(node_id),
                output,
                quote(&self.task.id)
            );
            self.send("executed", &data);
        }
        self.ui.push((node_id.to_string(), output));
        Ok(())
    }

    /// The prompt's history entry: the task, outputs, status with messages, and meta.
    fn history_entry(&self, outcome: Outcome) -> String {
        let outputs: Vec<String> = self.ui.iter().map(|(node, output)| format!("{}:{output}", quote(node))).collect();
        let meta: Vec<String> = self
            .ui
            .iter()
            .map(|(node, _)| {
                let q = quote(node);
                format!(r#"{q}:{{"node_id":{q},"display_node":{q},"parent_node":null,"real_node_id":{q}}}"#)
            })
            .collect();
        let messages: Vec<String> = self.messages.iter().map(|(event, data)| format!(r#"["{event}",{data}]"#)).collect();
        let success = outcome == Outcome::Success;
        format!(
            r#"{{"prompt":{},"outputs":{{{}}},"status":{{"status_str":"{}","completed":{success},"messages":[{}]}},"meta":{{{}}}}}"#,
            self.task.render(),
            outputs.join(","),
            if success { "success" } else { "error" },
            messages.join(","),
            meta.join(",")
        )
    }
}

/// The next file number for `base` in `folder`: one past the highest `base_NNNNN_…`
/// there, as ComfyUI's `get_save_image_path` counts, so files never clash.
fn next_counter(folder: &std::path::Path, base: &str) -> u64 {
    let Ok(entries) = fs::read_dir(folder) else { return 1 };
    let lead = format!("{base}_");
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().into_string().ok())
        .filter_map(|name| {
            let rest = name.strip_prefix(&lead)?;
            Some(rest.split('_').next().and_then(|d| d.parse::<u64>().ok()).unwrap_or(0))
        })
        .max()
        .map_or(1, |highest| highest + 1)
}
