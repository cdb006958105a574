"""The embedded default dataset: a synthetic wuxia world.

Invented characters with facts (门派, 师父, 绝学, 兵器, 籍贯, 出生年, 好友, 仇人, 外号), rendered as
biographies in many phrasings and fact orders (pretraining text) and as Q&A pairs with short exact
answers (SFT). The Q&A of a held-out share of the characters go to the test set: answering them
needs what pretraining stored about those characters, extracted through SFT on the others.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from miniglm.fileio import UserError, atomic_dir, write_json, write_jsonl

SURNAMES = list(
    "赵钱孙李周吴郑王冯陈褚卫蒋沈韩杨朱秦尤许何吕施张孔曹严华金魏陶姜谢邹柏窦章云苏潘葛范彭鲁韦马苗凤花方"
    "俞任袁柳鲍史唐费薛雷贺倪汤殷罗毕郝安常于傅齐康伍余顾孟平黄穆萧尹姚邵汪祁毛狄米明戴宋庞熊纪舒屈项祝董"
    "梁杜阮蓝席季贾江童颜郭梅林钟徐邱骆高夏蔡田胡凌霍万柯卢莫"
) + ["欧阳", "慕容", "上官", "司马", "东方", "独孤", "南宫", "令狐", "西门", "诸葛", "公孙", "皇甫", "端木",
     "宇文", "轩辕", "夏侯", "司徒", "尉迟", "百里", "长孙"]
GIVEN = list(
    "云天风剑雪月飞龙虎清明玉霜寒星辰峰海山青白紫若冰逸轩啸傲雄英杰豪华文武德仁义智信忠勇刚毅远志鸿鹏鹤燕"
    "莺蝶兰梅竹菊莲松柏枫桐琴棋书画诗灵秀婉柔静淑慧敏思念怀恩承宗光辉耀晨曦阳霞虹雷霄宇乾坤朗俊彦昭弘玄"
    "冥无忌悔惊鸣沧澜涛浩渊墨尘羽翎岚烟瑶琳琪璇瑾瑜珊麟骁骏驰铮锋钧铁石"
)
SECTS = ["少林派", "武当派", "峨眉派", "昆仑派", "华山派", "崆峒派", "丐帮", "明教", "天山派", "青城派",
         "点苍派", "逍遥派", "全真教", "古墓派", "桃花岛", "五毒教", "日月神教", "星宿派", "雪山派", "唐门"]
SKILL_HEADS = ["降龙", "玄冥", "太极", "九阴", "六脉", "天山", "凌波", "北冥", "独孤", "金刚", "罗汉", "落英",
               "弹指", "七伤", "乾坤", "紫霞", "寒冰", "烈焰", "追风", "碧海", "青云", "流星", "白虹", "摧心",
               "化骨", "逍遥", "无相", "天罡", "须弥", "玉女"]
SKILL_TAILS = ["掌", "剑法", "拳", "刀法", "指", "神功", "腿法", "身法", "枪法", "爪", "心经", "棍法"]
WEAPON_HEADS = ["玄铁", "青钢", "紫金", "寒玉", "乌金", "赤铜", "白银", "碧玉", "精钢", "龙鳞", "凤翎", "紫竹",
                "铁木", "星陨", "雪影", "烈火", "秋水", "流云", "古松", "沉香"]
WEAPON_TAILS = ["剑", "刀", "枪", "棍", "鞭", "扇", "箫", "杖", "斧", "钩", "笔", "环"]
TOWNS = ["苏州", "杭州", "扬州", "洛阳", "长安", "开封", "大理", "襄阳", "成都", "泉州", "福州", "太原", "济南",
         "金陵", "临安", "江陵", "岳阳", "衡阳", "桂林", "兰州", "敦煌", "凉州", "幽州", "燕京", "辽东", "徽州",
         "绍兴", "嘉兴", "汉中", "洞庭"]
NICK_HEADS = ["玉面", "铁臂", "神行", "追魂", "妙手", "金刀", "白衣", "赤发", "笑面", "鬼影", "独臂", "飞天",
              "醉眼", "青衫", "血手", "铁掌", "无影", "摘星", "翻江", "震天", "冷面", "银枪", "紫髯", "踏雪"]
NICK_TAILS = ["书生", "神猿", "太保", "判官", "仙子", "罗刹", "狂生", "剑客", "飞鹰", "蛟龙", "猛虎", "童子",
              "居士", "头陀", "神君", "侠女", "老怪", "刀客", "神丐", "剑仙"]

# fact type -> (biography phrasings (at least 5), question phrasings (at least 2))
FACTS: dict[str, tuple[list[str], list[str]]] = {
    "门派": (["{n}是{v}弟子。", "{n}出身{v}。", "{n}自幼拜入{v}门下。", "{n}乃{v}门人。", "论门派，{n}属于{v}。"],
           ["{n}是哪个门派的？", "{n}出身什么门派？", "{n}属于哪一派？"]),
    "师父": (["{n}的师父是{v}。", "{n}拜{v}为师。", "{n}师从{v}。", "{v}是{n}的授业恩师。",
            "{n}的一身武艺得自{v}的真传。"],
           ["{n}的师父是谁？", "{n}拜谁为师？", "谁是{n}的师父？"]),
    "绝学": (["{n}的绝学是{v}。", "{n}最擅长{v}。", "{n}凭一手{v}名动江湖。", "{n}苦练{v}多年，已臻化境。",
            "说到{n}的看家本领，当数{v}。"],
           ["{n}的绝学是什么？", "{n}最擅长什么武功？", "{n}的看家本领是什么？"]),
    "兵器": (["{n}惯用的兵器是{v}。", "{n}手中常持{v}。", "{n}的兵器是{v}。", "{n}随身携带{v}，从不离身。",
            "{n}行走江湖，靠的是一柄{v}。"],
           ["{n}用什么兵器？", "{n}的兵器是什么？"]),
    "籍贯": (["{n}是{v}人。", "{n}籍贯{v}。", "{n}祖籍{v}。", "{n}来自{v}。", "{n}的家乡在{v}。"],
           ["{n}是哪里人？", "{n}的籍贯是哪里？", "{n}的家乡在哪里？"]),
    "出生年": (["{n}生于{v}。", "{n}出生于{v}。", "{n}于{v}出生。", "{v}，{n}降生。", "{n}是{v}生人。"],
            ["{n}是哪一年出生的？", "{n}生于哪一年？"]),
    "好友": (["{n}与{v}是至交好友。", "{n}的好友是{v}。", "{v}是{n}的知己。", "{n}和{v}情同手足。",
            "{n}与{v}交情深厚。"],
           ["{n}的好友是谁？", "谁是{n}的知己？"]),
    "仇人": (["{n}的仇人是{v}。", "{n}与{v}有不共戴天之仇。", "{v}是{n}的死敌。", "{n}一生最恨{v}。",
            "{n}与{v}结下了血海深仇。"],
           ["{n}的仇人是谁？", "{n}与谁有仇？"]),
    "外号": (["{n}人称{v}。", "{n}外号{v}。", "江湖上称{n}为{v}。", "{n}的外号是{v}。", "{n}有个绰号叫{v}。"],
           ["{n}的外号是什么？", "江湖上怎么称呼{n}？"]),
}


@dataclass
class WorldStats:
    characters: int
    train_characters: int
    test_characters: int
    biographies: int
    corpus_characters: int
    sft_train: int
    sft_test: int


def _unique_names(n: int, rng: random.Random) -> list[str]:
    capacity = len(SURNAMES) * (len(GIVEN) + len(GIVEN) ** 2)
    if n > capacity // 4:
        raise UserError(f"--characters {n} is too many for the name pool (at most {capacity // 4})")
    names: dict[str, None] = {}
    while len(names) < n:
        given = "".join(rng.choice(GIVEN) for _ in range(1 if rng.random() < 0.25 else 2))
        names[rng.choice(SURNAMES) + given] = None
    return list(names)


MIN_CHARACTERS = 4  # a master, a friend and an enemy for everyone


def make_characters(n: int, seed: int) -> list[dict]:
    """n characters with one value per fact type. Masters come from the same sect where possible."""
    if n < MIN_CHARACTERS:
        raise UserError(f"--characters must be at least {MIN_CHARACTERS}, got {n}")
    rng = random.Random(seed)
    names = _unique_names(n, rng)
    chars = [{
        "name": name,
        "门派": rng.choice(SECTS),
        "绝学": rng.choice(SKILL_HEADS) + rng.choice(SKILL_TAILS),
        "兵器": rng.choice(WEAPON_HEADS) + rng.choice(WEAPON_TAILS),
        "籍贯": rng.choice(TOWNS),
        "出生年": f"{rng.randint(1100, 1199)}年",
        "外号": rng.choice(NICK_HEADS) + rng.choice(NICK_TAILS),
    } for name in names]
    by_sect: dict[str, list[str]] = {}
    for c in chars:
        by_sect.setdefault(c["门派"], []).append(c["name"])

    def other(pool: list[str], me: str) -> str:
        while True:
            pick = rng.choice(pool)
            if pick != me:
                return pick

    for c in chars:
        same_sect = by_sect[c["门派"]]
        c["师父"] = other(same_sect if len(same_sect) > 1 else names, c["name"])
        c["好友"] = other(names, c["name"])
        c["仇人"] = other(names, c["name"])
        while c["仇人"] == c["好友"]:
            c["仇人"] = other(names, c["name"])
    return chars


def biography(c: dict, rng: random.Random) -> str:
    """Every fact in one of its phrasings, in a random order."""
    facts = list(FACTS)
    rng.shuffle(facts)
    return "".join(rng.choice(FACTS[f][0]).format(n=c["name"], v=c[f]) for f in facts)


def qa_pairs(c: dict, rng: random.Random, all_phrasings: bool) -> list[dict]:
    out = []
    for fact, (_, questions) in FACTS.items():
        for q in questions if all_phrasings else [rng.choice(questions)]:
            out.append({"question": q.format(n=c["name"]), "answer": c[fact], "character": c["name"], "fact": fact})
    return out


def build_world(out_dir: str | Path, characters: int = 500, bios_per_character: int = 6,
                heldout_fraction: float = 0.5, seed: int = 1337) -> WorldStats:
    """Write characters.jsonl, corpus.jsonl (biographies), sft_train.jsonl, sft_test.jsonl, stats.json."""
    if bios_per_character < 1:
        raise UserError("--bios must be at least 1")
    if not 0.0 < heldout_fraction < 1.0:
        raise UserError(f"--heldout-fraction must be in (0, 1), got {heldout_fraction}")
    rng = random.Random(seed + 1)
    chars = make_characters(characters, seed)
    n_test = max(1, round(len(chars) * heldout_fraction))
    order = list(range(len(chars)))
    rng.shuffle(order)
    test_ids = set(order[:n_test])
    for i, c in enumerate(chars):
        c["split"] = "test" if i in test_ids else "train"

    bios = [{"text": biography(c, rng), "character": c["name"]} for c in chars for _ in range(bios_per_character)]
    rng.shuffle(bios)  # so a split by document mixes characters
    # Training characters are asked every phrasing; held-out characters one phrasing per fact.
    sft_train = [qa for c in chars if c["split"] == "train" for qa in qa_pairs(c, rng, all_phrasings=True)]
    sft_test = [qa for c in chars if c["split"] == "test" for qa in qa_pairs(c, rng, all_phrasings=False)]
    rng.shuffle(sft_train)

    stats = WorldStats(characters=len(chars), train_characters=len(chars) - n_test, test_characters=n_test,
                       biographies=len(bios), corpus_characters=sum(len(b["text"]) for b in bios),
                       sft_train=len(sft_train), sft_test=len(sft_test))
    with atomic_dir(out_dir) as tmp:
        write_jsonl(tmp / "characters.jsonl", chars)
        write_jsonl(tmp / "corpus.jsonl", bios)
        write_jsonl(tmp / "sft_train.jsonl", sft_train)
        write_jsonl(tmp / "sft_test.jsonl", sft_test)
        write_json(tmp / "stats.json", stats.__dict__)
    return stats

