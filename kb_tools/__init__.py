"""ReDi and T-Stitch for ComfyUI, as a library: the public names below are what the nodes, the offline command,
the demo and the benchmarks call.

Rooms, each importing only those before it (tests/test_layering.py holds the rule):
    core/         pure math and records, no ComfyUI: weights, blends, schedules, coarse grids, errors
    store/        the knowledge base on disk: format, FAISS indexes, transactions, retrieval, learning appends
    comfy/        everything that imports ComfyUI: counted sampling, guiders, model facts, environment
    calibration/  what a KB measures about itself: the guards, the blend-error model, the plain reference
    samplers/     one sampler per file: ReDi (Algorithm 2), the KB-corrected solver, T-Stitch, learning
    build/        building KBs (Algorithm 1), job files, Ray, the `python -m kb_tools` command

Importing kb_tools imports nothing: a public name loads its room on first use, so the command line and the
pure rooms work without ComfyUI (only comfy/ and samplers/ need it).
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

#: public name -> the module (under kb_tools) that defines it
_PUBLIC = {
    # core
    **dict.fromkeys(("KBError", "KBMismatchError", "KBChangedError"), "core.errors"),
    "Recipe": "core.records",
    **dict.fromkeys(("parse_steps", "default_store_steps", "plan_redi", "ReDiPlan", "Switch"), "core.schedule"),
    **dict.fromkeys(("WEIGHT_MODES", "fit_weights", "WeightFit"), "core.weights"),
    **dict.fromkeys(("coarse_grid", "parse_grid"), "core.coarse_grid"),
    **dict.fromkeys(("SWITCH_MODES", "node_switch", "check_stitch_compatible"), "core.stitch"),
    "Evaluations": "core.evaluations",
    **dict.fromkeys(("calibrated_step", "dpmpp_2m_coefficients"), "core.multistep"),
    # store
    **dict.fromkeys(("KnowledgeBase", "KBBudget", "KBSettings", "check_kb_name", "open_or_create", "evict_oldest", "merge",
                     "AUTO_FLAT_MAX_ENTRIES", "FORMAT_VERSION"), "store"),
    **dict.fromkeys(("nearest_keys", "blend_entries", "NearestKeys"), "store.retrieval"),
    **dict.fromkeys(("learn", "LearnReport"), "store.learning"),
    # comfy
    **dict.fromkeys(("sampler_names", "scheduler_names", "schedule_sigmas", "seeded_noise"), "comfy.model_facts"),
    **dict.fromkeys(("batch_conditioning", "cfg_guider", "sample_prompts"), "comfy.plain"),
    "sample_counted": "comfy.counted",
    **dict.fromkeys(("PLAIN_SAMPLERS", "PLAIN_SCHEDULES", "COMMON_SAMPLERS", "COMMON_SCHEDULES", "plain_sigmas", "schedule_names", "steps_for_nfe", "nfe_for_steps"),
                    "comfy.schedules"),
    # calibration
    **dict.fromkeys(("GUARD_AUTO", "FALLBACK_GUARD", "default_tolerance"), "calibration.guard"),
    "calibrate": "calibration.residuals",
    **dict.fromkeys(("fit_coefficients", "SamplerFit"), "calibration.sampler_fit"),
    # samplers
    **dict.fromkeys(("generate", "make_run", "redi_ksampler", "sample_redi", "ReDiRun"), "samplers.redi"),
    "ReDiResult": "samplers.result",
    **dict.fromkeys(("KBNoise", "query_seeds", "check_recipe"), "samplers.entry"),
    **dict.fromkeys(("sample_to_key", "find_neighbours", "blend_at", "resume", "KeyQuery", "QueryNeighbours",
                     "BlendedValue"), "samplers.redi_chain"),
    **dict.fromkeys(("make_corrected_run", "corrected_ksampler", "sample_kb_corrected_euler"), "samplers.corrected"),
    **dict.fromkeys(("calibrated_ksampler", "sample_calibrated", "load_sampler_calibration", "SamplerCalibration",
                     "CalibratedChoice"), "samplers.calibrated"),
    **dict.fromkeys(("generate_learning", "generate_learning_corrected", "LearningResult", "LearningCorrectedResult"),
                    "samplers.learning"),
    **dict.fromkeys(("tstitch_guider", "tstitch_sample", "TStitchResult"), "samplers.tstitch"),
    # build
    **dict.fromkeys(("BuildSpec", "BuildReport", "build_knowledge_base", "kb_settings_for", "learning_settings"),
                    "build.builder"),
    **dict.fromkeys(("input_file", "read_prompts"), "build.prompts"),
    "calibrate_sampler": "build.sampler_calibration",
}

__all__ = sorted(_PUBLIC)

if TYPE_CHECKING:  # the same names for type checkers and readers of the import graph; at run time they load lazily
    from .build.builder import build_knowledge_base, BuildReport, BuildSpec, kb_settings_for, learning_settings
    from .build.prompts import input_file, read_prompts
    from .build.sampler_calibration import calibrate_sampler
    from .calibration.guard import default_tolerance, FALLBACK_GUARD, GUARD_AUTO
    from .calibration.residuals import calibrate
    from .calibration.sampler_fit import fit_coefficients, SamplerFit
    from .comfy.counted import sample_counted
    from .comfy.model_facts import sampler_names, schedule_sigmas, scheduler_names, seeded_noise
    from .comfy.schedules import COMMON_SAMPLERS, COMMON_SCHEDULES, nfe_for_steps, PLAIN_SAMPLERS, PLAIN_SCHEDULES, plain_sigmas, schedule_names, steps_for_nfe
    from .comfy.plain import batch_conditioning, cfg_guider, sample_prompts
    from .core.coarse_grid import coarse_grid, parse_grid
    from .core.errors import KBChangedError, KBError, KBMismatchError
    from .core.evaluations import Evaluations
    from .core.multistep import calibrated_step, dpmpp_2m_coefficients
    from .core.records import Recipe
    from .core.schedule import default_store_steps, parse_steps, plan_redi, ReDiPlan, Switch
    from .core.stitch import check_stitch_compatible, node_switch, SWITCH_MODES
    from .core.weights import fit_weights, WEIGHT_MODES, WeightFit
    from .samplers.calibrated import (
        calibrated_ksampler, CalibratedChoice, load_sampler_calibration, sample_calibrated, SamplerCalibration
    )
    from .samplers.corrected import corrected_ksampler, make_corrected_run, sample_kb_corrected_euler
    from .samplers.entry import check_recipe, KBNoise, query_seeds
    from .samplers.learning import (
        generate_learning, generate_learning_corrected, LearningCorrectedResult, LearningResult
    )
    from .samplers.redi import generate, make_run, redi_ksampler, ReDiRun, sample_redi
    from .samplers.redi_chain import (
        blend_at, BlendedValue, find_neighbours, KeyQuery, QueryNeighbours, resume, sample_to_key
    )
    from .samplers.result import ReDiResult
    from .samplers.tstitch import tstitch_guider, tstitch_sample, TStitchResult
    from .store import (
        AUTO_FLAT_MAX_ENTRIES, check_kb_name, evict_oldest, FORMAT_VERSION, KBBudget, KBSettings, KnowledgeBase,
        merge, open_or_create
    )
    from .store.learning import learn, LearnReport
    from .store.retrieval import blend_entries, nearest_keys, NearestKeys


def __getattr__(name: str):
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
