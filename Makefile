# cxrlabel: the pipeline's stages as make targets. Paths and settings are overridable:
#   make catalogue DATA=/mnt/public DB=postgresql+psycopg://me@host/cxr
# Every target installs what it needs into .venv first (CPU torch pinned; see README).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DATA   ?= ../shared/data
DB     ?= sqlite:///data/catalogue.db
CACHE  ?= data/cache
GROUP  ?= cardiomegaly
MODEL  ?= default
PRESET ?= cxr_deep
EPOCHS ?=
DEMO_N ?= 200
OUT    ?= data
NIH_CSV := $(DATA)/catalogues/nih/Data_Entry_2017_v2020.csv.gz
CX     := $(BIN)/cxrlabel --db $(DB)
export CXRLABEL_CACHE := $(CACHE)

.PHONY: install test test-readme lint catalogue masks train train-cv label demo bench bench-quick clean-data

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

test: install
	$(BIN)/python -m pytest -q --durations=10 -m "not readme"

# Every bash block of README.md, run as written on the demo's data (tests/test_readme.py: it
# builds the demo with make, then adapts the shipped model as the README does: minutes)
test-readme: install
	$(BIN)/python -m pytest -q --durations=5 -m readme tests/test_readme.py

lint: install
	$(BIN)/ruff check pipeline tests bench
	$(BIN)/mypy pipeline

catalogue: install
	$(CX) catalogue load nih $(NIH_CSV) --image-root $(DATA)/nih-samples
	$(CX) groups assign
	$(CX) groups list

# Both annotated sources: GeneralBlockchain (cardiomediastinum, lungs drawn on behind the
# heart) and the Wingspan half (the heart alone, SCR lungs)
masks: install
	$(CX) masks import generalblockchain $(DATA)/generalblockchain
	$(CX) masks import png-dirs $(DATA)/wingspan --images png --source wingspan \
	    --mask heart=mask/heart --mask left_lung=mask/left_lung --mask right_lung=mask/right_lung

# The shipped default: all 100 annotated images, the preset chosen by cross-validation.
train: masks
	$(CX) train --model $(PRESET) --val-frac 0 --name $(PRESET)_all $(if $(EPOCHS),--epochs $(EPOCHS))
	$(CX) models export runs/$(PRESET)_all/best.pt runs/$(PRESET)_all/model.pt
	@echo "to ship it: cp runs/$(PRESET)_all/model.pt models/default/model.pt (and update the model card)"

# 5-fold cross-validation of a preset (what the model card reports).
train-cv: masks
	$(CX) train --model $(PRESET) --folds 5 --name $(PRESET)_cv $(if $(EPOCHS),--epochs $(EPOCHS))

# Exit status 3 (some images failed, the rest labelled) is expected here: the NIH catalogue
# lists 112,120 films and only two of them lie in ../shared; `cxrlabel failures` lists the rest.
label: install
	$(CX) label --group $(GROUP) --model $(MODEL) || [ $$? -eq 3 ]

# End to end on the shared data: catalogue, annotated masks, a simulated clinic archive of
# DEMO_N DICOM files with (synthetic) reports, collect, label, evaluate, report.
demo: catalogue masks
	$(BIN)/python bench/clinic.py $(DEMO_N) --out $(OUT)/demo_clinic --data $(DATA)
	$(CX) catalogue load dicom $(OUT)/demo_clinic --text-csv $(OUT)/demo_clinic/reports.csv \
	    --text-key sop_uid --text-key-column SOPInstanceUID --text-column Report
	$(CX) groups assign
	$(CX) collect --source dicom --model $(MODEL)
	$(CX) label --source dicom --model $(MODEL)
	$(CX) label --source generalblockchain --model $(MODEL)
	$(CX) label --source wingspan --model $(MODEL)
	@echo "Against the annotated sets (the model's figures leave out the films it trained on: the shipped default"
	@echo "trained on all 231 annotated films, so it has none to show here; its cross-validated figures follow):"
	$(CX) evaluate --truth manual --model $(MODEL) --out $(OUT)/reports
	@sed -n '/^| held out, all five folds/,/^$$/p' models/default/MODEL_CARD.md
	@echo "The demo clinic's reports are synthetic (bench/clinic.py draws them at random for real films): its"
	@echo "cardiomegaly and healthy groups do not differ in CTR, so expect a ROC AUC near 0.5 here."
	$(CX) report --group cardiomegaly --group healthy --model $(MODEL) --out $(OUT)/reports
	$(CX) query sql/queries/ctr_by_group.sql
	$(CX) export rle --all --model $(MODEL) --out $(OUT)/exports/masks.csv
	$(CX) export seg --group cardiomegaly --model $(MODEL) --out $(OUT)/exports/seg
	@echo "catalogue: $(DB)   cache: $(CACHE)   reports: $(OUT)/reports/   clinic: $(OUT)/demo_clinic/"
	@echo "exports: $(OUT)/exports/   review the masks: $(CX) review --reviewer NAME (http://127.0.0.1:8765)"

# bench/gpu.py needs CUDA and bench/db_write.py a --db URL: run them by hand (see bench/RESULTS.md)
bench: install
	$(BIN)/python bench/groups_openi.py
	$(BIN)/python bench/catalogue.py
	$(BIN)/python bench/collect.py
	$(BIN)/python bench/label.py
	$(BIN)/python bench/overhead.py
	$(BIN)/python bench/reliability.py

# The guard on labelling's pace, before a change to the labelling path lands (under 5 minutes on
# 2 cores): warm and cold throughput against the goals, each the median of three alternated
# runs, and every step's CPU ms per image. A benchmark: nothing fails on a ratio.
bench-quick: install
	$(BIN)/python bench/label.py --n 100 --repeat 3
	$(BIN)/python bench/overhead.py --n 40

clean-data:
	rm -rf data/catalogue.db data/catalogue.db-wal data/catalogue.db-shm $(CACHE) data/reports data/demo_clinic
